//! `icdit::scale_out` driven from Rust, without the binary: a shard stopped after one part
//! resumes without redoing it, two shards (one from a torchrun-style environment) merge to
//! the unsharded run byte for byte, a folder refuses a run with other settings, and an
//! interrupted run keeps its manifest and says how to resume.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::TempDir;
use icdit::image::Rounding;
use icdit::scale_out::{self, resolve_shard, Manifest, RunSettings, ShardChoice};
use icdit::{DitModel, EngineOptions, Error, LoadOptions, Sampler};

fn bundled() -> Arc<DitModel> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/icdit-shapes-32.safetensors");
    Arc::new(DitModel::load(&path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}")))
}

/// Three DDIM steps with guidance: enough to exercise the sampler, quick on two threads.
fn opts() -> EngineOptions {
    EngineOptions {
        respacing: "ddim3".into(),
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale: 4.0,
        threads: 2,
        ..Default::default()
    }
}

fn settings(dir: &Path, shard: ShardChoice) -> RunSettings {
    RunSettings {
        dir: dir.to_path_buf(),
        num_images: 6,
        shard,
        devices: None,
        png: false,
        max_parts: None,
        rounding: Rounding::Dit,
        seed: 3,
        batch: 2,
        backend: icdit::backend::Backend::Cpu,
        interrupt: None,
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// `arr_0` of an .npz: shape and bytes.
fn arr0(path: &Path) -> (Vec<u64>, Vec<u8>) {
    let mut z = npyz::npz::NpzArchive::open(path).unwrap();
    let a = z.by_name("arr_0").unwrap().expect("arr_0");
    (a.shape().to_vec(), a.into_vec().unwrap())
}

#[test]
fn shards_resume_and_merge_to_the_unsharded_run() {
    let (model, opts) = (bundled(), opts());
    let root = TempDir::new("api");
    let (one, two) = (root.join("one"), root.join("two"));

    let whole = scale_out::run(&model, &opts, None, &settings(&one, resolve_shard(None, None, &no_env).unwrap()))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(whole.done && whole.sampled == 6 && whole.skipped == 0 && whole.left == 0);
    assert_eq!(whole.parts_by_device, [(0, 3)]);

    // Shard 0 of 2 (images 0..3, parts of 2 and 1), stopped after one part, then resumed.
    let first = resolve_shard(Some(0), Some(2), &no_env).unwrap();
    let stopped =
        scale_out::run(&model, &opts, None, &RunSettings { max_parts: Some(1), ..settings(&two, first.clone()) })
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((stopped.range, stopped.sampled, stopped.left, stopped.done), ([0, 3], 2, 1, false));
    let kept = two.join("part-000000-000002.npz");
    let before = std::fs::read(&kept).unwrap();
    let resumed = scale_out::run(&model, &opts, None, &settings(&two, first)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((resumed.skipped, resumed.sampled, resumed.done), (2, 1, true));
    assert_eq!(std::fs::read(&kept).unwrap(), before);

    // Shard 1 of 2 from a torchrun-style environment.
    let env = |name: &str| match name {
        "RANK" => Some("1".to_string()),
        "WORLD_SIZE" => Some("2".to_string()),
        _ => None,
    };
    let second = resolve_shard(None, None, &env).unwrap();
    assert_eq!((second.index, second.count), (1, 2));
    let last = scale_out::run(&model, &opts, None, &settings(&two, second)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((last.range, last.sampled, last.done), ([3, 6], 3, true));
    let m = Manifest::read(&last.manifest).unwrap();
    assert_eq!((m.shard, m.num_shards, m.images_done, m.done), (1, 2, 3, true));
    assert_eq!(m.settings["seed"], 3);
    assert_eq!(m.settings["sampler"], "ddim(eta=0)");

    let (x, y) = (root.join("one.npz"), root.join("two.npz"));
    let merged = scale_out::merge(&[&one], &x).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((merged.num_images, merged.image_hwc, merged.shards, merged.parts), (6, [32, 32, 3], 1, 3));
    let merged = scale_out::merge(&[&two], &y).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((merged.shards, merged.parts), (2, 4));
    let (shape, pixels) = arr0(&x);
    assert_eq!(shape, [6, 32, 32, 3]);
    assert!(pixels.iter().any(|&p| p != pixels[0]), "the images are one flat colour");
    assert!(arr0(&y) == (shape, pixels), "two shards differ from the unsharded run");
    assert!(std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(), "merged .npz files differ");

    // The folder holds a run with seed 3: a run with seed 4 is refused before any work.
    let other = RunSettings { seed: 4, ..settings(&one, resolve_shard(None, None, &no_env).unwrap()) };
    match scale_out::run(&model, &opts, None, &other) {
        Err(e @ Error::Config { .. }) => assert!(e.to_string().contains("seed: 3 vs 4"), "{e}"),
        other => panic!("expected a settings mismatch, got {:?}", other.map(|r| r.done)),
    }
}

#[test]
fn an_interrupted_run_keeps_its_manifest_and_resumes() {
    let (model, opts) = (bundled(), opts());
    let root = TempDir::new("api-interrupt");
    let interrupt = Arc::new(AtomicBool::new(true));
    let run = RunSettings {
        interrupt: Some(Arc::clone(&interrupt)),
        ..settings(&root, resolve_shard(None, None, &no_env).unwrap())
    };
    match scale_out::run(&model, &opts, None, &run) {
        Err(Error::Interrupted { done }) => {
            assert!(done.contains("0 of 6 images") && done.contains("resumes"), "{done}")
        }
        other => panic!("expected an interruption, got {:?}", other.map(|r| r.done)),
    }
    let m = Manifest::read(&root.join("shard-00000-of-00001.json")).unwrap();
    assert!(!m.done && m.parts.is_empty());
    interrupt.store(false, std::sync::atomic::Ordering::Relaxed);
    let resumed = scale_out::run(&model, &opts, None, &run).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((resumed.sampled, resumed.skipped, resumed.done), (6, 0, true));
}
