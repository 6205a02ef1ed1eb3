//! Scale-out sampling through the `icdit` binary on the bundled model: shards merge to the
//! unsharded run byte for byte, stopped and killed shards resume without redoing finished
//! parts, mismatched shards are refused, and the shard comes from each launcher's
//! environment variables.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::TempDir;

/// Every variable a launcher may set: cleared for each child, so the tests do not depend on
/// running (or not) under torchrun, Slurm or Kubernetes themselves.
const LAUNCH_VARS: [&str; 7] =
    ["RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "JOB_COMPLETION_INDEX", "ICDIT_SHARD", "ICDIT_NUM_SHARDS"];

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_icdit"));
    for v in LAUNCH_VARS {
        c.env_remove(v);
    }
    c.args(args).envs(env.iter().copied());
    c
}

fn icdit_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env).output().expect("run icdit")
}

fn icdit(args: &[&str]) -> Output {
    icdit_env(args, &[])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "icdit failed ({:?}): {}", o.status.code(), stderr(&o));
    o
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `sample --num-images N --out DIR` on the bundled model (its recommended DDIM and cfg 4)
/// with 5 steps, seed 3 and 2 threads unless `extra` says otherwise, plus `extra`.
fn sample_args(n: u64, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["sample".into(), "--num-images".into(), n.to_string(), "--out".into(), s(dir)];
    for (flag, value) in [("--steps", "5"), ("--seed", "3"), ("--threads", "2")] {
        if !extra.contains(&flag) {
            a.extend([flag.to_string(), value.to_string()]);
        }
    }
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn run_sample(n: u64, dir: &Path, extra: &[&str]) -> Output {
    let a = sample_args(n, dir, extra);
    icdit(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn merge(out: &Path, inputs: &[&Path]) -> Output {
    let mut a = vec!["merge".to_string(), "--out".into(), s(out)];
    a.extend(inputs.iter().map(|p| s(p)));
    icdit(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `arr_0` of an .npz: shape and bytes.
fn arr0(path: &Path) -> (Vec<u64>, Vec<u8>) {
    let mut z = npyz::npz::NpzArchive::open(path).unwrap();
    let a = z.by_name("arr_0").unwrap().expect("arr_0");
    (a.shape().to_vec(), a.into_vec().unwrap())
}

/// Every file in a folder, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

fn manifest(dir: &Path, shard: u64, of: u64) -> serde_json::Value {
    let p = dir.join(format!("shard-{shard:05}-of-{of:05}.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// (inode, modification time) of a file: unchanged when a resumed run leaves it alone.
fn stamp(p: &Path) -> (u64, i64, i64) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.ino(), m.mtime(), m.mtime_nsec())
}

fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn three_shards_merge_to_the_unsharded_run_byte_for_byte() {
    let root = TempDir::new("equal");
    let t = Instant::now();
    let (one, three) = (root.join("one"), root.join("three"));
    ok(run_sample(30, &one, &["--batch", "16", "--png"]));
    for i in 0..3 {
        // A different batch size too: batch composition must not change any pixel.
        ok(run_sample(30, &three, &["--batch", "4", "--png", "--shard", &i.to_string(), "--num-shards", "3"]));
    }
    let (a, b) = (root.join("one.npz"), root.join("three.npz"));
    ok(merge(&a, &[&one]));
    let o = ok(merge(&b, &[&three]));
    assert!(stderr(&o).contains("merged 30 images from 3 shards (9 parts)"), "{}", stderr(&o));
    let (shape, pixels) = arr0(&a);
    assert_eq!(shape, [30, 32, 32, 3]);
    assert!(pixels.iter().any(|&p| p != pixels[0]), "pixels are not constant");
    assert!(arr0(&b) == (shape.clone(), pixels.clone()), "arr_0 of 3 merged shards differs");
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "merged .npz files differ");

    // The same images as a plain one-process `sample` of the same labels writes.
    let labels = icdit::noise::class_labels(3, 0, 30, 10);
    let plain = root.join("plain.npz");
    ok(icdit(&["sample", "--random-classes", "30", "--steps", "5", "--seed", "3", "--npz", &s(&plain)]));
    assert!(arr0(&plain).1 == pixels, "--num-images vs --random-classes");

    // PNGs: the same files, named by global index, class and seed.
    let (pa, pb) = (files(&one.join("images")), files(&three.join("images")));
    assert_eq!(pa.len(), 30);
    assert!(pa == pb, "PNG folders differ");
    for (k, c) in labels.iter().enumerate() {
        assert!(pa.contains_key(&format!("{k:06}-class{c}-seed3.png")), "image {k}");
    }
    // Manifests as files instead of the folder; no temporary files anywhere.
    let shards: Vec<PathBuf> = (0..3).map(|i| three.join(format!("shard-{i:05}-of-00003.json"))).collect();
    let c = root.join("from-files.npz");
    ok(merge(&c, &shards.iter().map(PathBuf::as_path).collect::<Vec<_>>()));
    assert!(std::fs::read(&c).unwrap() == std::fs::read(&a).unwrap(), "merged from manifest files");
    let m = manifest(&three, 1, 3);
    assert_eq!((m["range"][0].as_u64(), m["range"][1].as_u64(), m["done"].as_bool()), (Some(10), Some(20), Some(true)));
    for d in [&*root, &*one, &*three, &*one.join("images"), &*three.join("images")] {
        assert!(hidden(d).is_empty(), "{}: {:?}", d.display(), hidden(d));
    }
    eprintln!("sharded and unsharded runs of 30 images plus merges: {:.2} s", t.elapsed().as_secs_f64());
}

#[test]
fn a_stopped_shard_resumes_without_redoing_finished_parts() {
    let root = TempDir::new("resume");
    let run = root.join("run");
    let shard1 = ["--batch", "2", "--shard", "1", "--num-shards", "3", "--json"];
    // Images 5..10 of 15. Stop after two parts (5..7 and 7..9), as a time-limited job would.
    let o = ok(run_sample(15, &run, &[&shard1[..], &["--max-parts", "2"]].concat()));
    let r = json(&o);
    assert_eq!((r["sampled"].as_u64(), r["left"].as_u64(), r["done"].as_bool()), (Some(4), Some(1), Some(false)));
    let m = manifest(&run, 1, 3);
    assert_eq!(m["parts"].as_array().unwrap().len(), 2);
    assert_eq!(m["done"], false);
    let (p0, p1) = (run.join("part-000005-000007.npz"), run.join("part-000007-000009.npz"));
    let before = stamp(&p0);
    // Unfinished shards do not merge.
    let o = merge(&root.join("never.npz"), &[&run]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("unfinished") && stderr(&o).contains("shard-00001-of-00003.json"), "{}", stderr(&o));
    assert!(!root.join("never.npz").exists());
    // A lost part and a temporary file a killed run left behind.
    std::fs::remove_file(&p1).unwrap();
    std::fs::write(run.join(".part-000009-000010.npz.tmp-999999"), b"partial").unwrap();

    let o = ok(run_sample(15, &run, &shard1));
    let r = json(&o);
    assert_eq!((r["skipped"].as_u64(), r["sampled"].as_u64(), r["done"].as_bool()), (Some(2), Some(3), Some(true)));
    assert!(stderr(&o).contains("part-000007-000009.npz is missing"), "{}", stderr(&o));
    assert_eq!(stamp(&p0), before, "a finished part was written again");
    assert!(hidden(&run).is_empty(), "{:?}", hidden(&run));
    // Once done, a rerun samples nothing and touches nothing.
    let stamps: Vec<_> = ["part-000005-000007.npz", "part-000007-000009.npz", "part-000009-000010.npz"]
        .iter()
        .map(|f| stamp(&run.join(f)))
        .collect();
    let r = json(&ok(run_sample(15, &run, &shard1)));
    assert_eq!((r["skipped"].as_u64(), r["sampled"].as_u64()), (Some(5), Some(0)));
    let again: Vec<_> = ["part-000005-000007.npz", "part-000007-000009.npz", "part-000009-000010.npz"]
        .iter()
        .map(|f| stamp(&run.join(f)))
        .collect();
    assert_eq!(stamps, again);

    // The rest of the run, then the result equals an uninterrupted run.
    for i in ["0", "2"] {
        ok(run_sample(15, &run, &["--batch", "2", "--shard", i, "--num-shards", "3"]));
    }
    let whole = root.join("whole");
    ok(run_sample(15, &whole, &[]));
    let (a, b) = (root.join("resumed.npz"), root.join("whole.npz"));
    ok(merge(&a, &[&run]));
    ok(merge(&b, &[&whole]));
    assert!(arr0(&a) == arr0(&b), "resumed run differs from the whole run");
}

#[test]
fn a_killed_shard_resumes_where_it_stopped() {
    let root = TempDir::new("kill");
    let run = root.join("run");
    // Slow enough to be killed part-way: 20 DDIM steps, one image per part.
    let args = ["sample", "--num-images", "6", "--steps", "20", "--seed", "5", "--batch", "1", "--threads", "1"];
    let mut a: Vec<&str> = args.to_vec();
    let out = s(&run);
    a.extend(["--out", &out]);
    let mut child = command(&a, &[]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while parts_done(&run) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let m = manifest(&run, 0, 1);
    let finished: Vec<String> =
        m["parts"].as_array().unwrap().iter().map(|p| p["file"].as_str().unwrap().to_string()).collect();
    assert!(finished.len() >= 2, "no part finished before the kill");
    assert!(!m["done"].as_bool().unwrap(), "the run finished before it could be killed; make it slower");
    let stamps: Vec<_> = finished.iter().map(|f| stamp(&run.join(f))).collect();

    a.push("--json");
    let r = json(&ok(command(&a, &[]).output().unwrap()));
    assert_eq!(r["skipped"].as_u64(), Some(finished.len() as u64));
    assert_eq!(r["sampled"].as_u64(), Some(6 - finished.len() as u64));
    assert_eq!(finished.iter().map(|f| stamp(&run.join(f))).collect::<Vec<_>>(), stamps);
    assert!(hidden(&run).is_empty(), "{:?}", hidden(&run));

    // Same pixels as a run that was never killed (in one batch).
    let whole = root.join("whole");
    let mut w: Vec<&str> = args.to_vec();
    w[8] = "6"; // --batch 6
    let wout = s(&whole);
    w.extend(["--out", &wout]);
    ok(command(&w, &[]).output().unwrap());
    let (x, y) = (root.join("killed.npz"), root.join("whole.npz"));
    ok(merge(&x, &[&run]));
    ok(merge(&y, &[&whole]));
    assert!(arr0(&x) == arr0(&y), "killed and resumed run differs from the whole run");
}

#[test]
fn mismatched_shards_are_refused() {
    let root = TempDir::new("mismatch");
    let (x, y, z) = (root.join("x"), root.join("y"), root.join("z"));
    for i in ["0", "1"] {
        ok(run_sample(10, &x, &["--shard", i, "--num-shards", "2"]));
    }
    ok(run_sample(10, &y, &["--shard", "1", "--num-shards", "2", "--seed", "4"]));
    ok(run_sample(10, &z, &["--shard", "1", "--num-shards", "2", "--steps", "6"]));
    let x0 = x.join("shard-00000-of-00002.json");
    for (other, words) in [(&y, "seed: 3 vs 4"), (&z, "respacing: \"5\" vs \"6\"")] {
        let other_manifest = other.join("shard-00001-of-00002.json");
        let out = root.join("bad.npz");
        let o = merge(&out, &[&x0, &other_manifest]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(3), "{err}");
        assert!(err.starts_with("error: ") && err.contains(words), "{err}");
        assert!(err.contains(&s(&x0)) && err.contains(&s(&other_manifest)), "{err}");
        assert!(!out.exists() && hidden(&root).is_empty());
    }
    // A shard with other settings is refused in a folder that holds a run.
    let o = run_sample(10, &x, &["--shard", "1", "--num-shards", "2", "--seed", "4"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("seed: 3 vs 4") && stderr(&o).contains("another --out folder"), "{}", stderr(&o));
    // A missing shard is named; so are shards of two shardings that overlap.
    let o = merge(&root.join("bad.npz"), &[&x0]);
    assert!(stderr(&o).contains("images 5..10 of 10 are in no part: missing shard manifests shard-00001-of-00002.json"));
    ok(run_sample(10, &x, &[]));
    let o = merge(&root.join("bad.npz"), &[&x]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("are in two parts"), "{}", stderr(&o));
    // Not a run folder at all.
    let o = merge(&root.join("bad.npz"), &[&root]);
    assert!(stderr(&o).contains("no shard manifests"), "{}", stderr(&o));
}

#[test]
fn the_shard_comes_from_each_launchers_environment() {
    let root = TempDir::new("env");
    #[allow(clippy::type_complexity)]
    let cases: &[(&str, &[(&str, &str)], &[&str], (u64, u64), (u64, u64))] = &[
        ("torchrun", &[("RANK", "1"), ("WORLD_SIZE", "3")], &[], (1, 3), (2, 4)),
        ("slurm", &[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "3")], &[], (2, 3), (4, 6)),
        ("k8s-flag", &[("JOB_COMPLETION_INDEX", "0")], &["--num-shards", "3"], (0, 3), (0, 2)),
        ("k8s-env", &[("JOB_COMPLETION_INDEX", "2"), ("ICDIT_NUM_SHARDS", "4")], &[], (2, 4), (3, 4)),
        ("icdit", &[("ICDIT_SHARD", "1"), ("ICDIT_NUM_SHARDS", "2")], &[], (1, 2), (3, 6)),
        (
            "torchrun-in-slurm",
            &[("RANK", "1"), ("WORLD_SIZE", "2"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")],
            &[],
            (1, 2),
            (3, 6),
        ),
        ("flags-win", &[("RANK", "0"), ("WORLD_SIZE", "2")], &["--shard", "2", "--num-shards", "3"], (2, 3), (4, 6)),
        ("none", &[], &[], (0, 1), (0, 6)),
    ];
    for (name, env, extra, (shard, of), (first, end)) in cases {
        let dir = root.join(name);
        let a = sample_args(6, &dir, &[&["--steps", "2", "--json"], *extra].concat());
        let o = ok(icdit_env(&a.iter().map(String::as_str).collect::<Vec<_>>(), env));
        let r = json(&o);
        assert_eq!((r["shard"].as_u64(), r["num_shards"].as_u64()), (Some(*shard), Some(*of)), "{name}");
        assert_eq!((r["range"][0].as_u64(), r["range"][1].as_u64()), (Some(*first), Some(*end)), "{name}");
        assert_eq!(manifest(&dir, *shard, *of)["done"], true, "{name}");
        println!("{name}: {}", stderr(&o).lines().next().unwrap_or(""));
    }
    // torchrun ranks 0..2 write one folder that merges into the whole run.
    let dir = root.join("ranks");
    for rank in ["0", "1", "2"] {
        let a = sample_args(6, &dir, &["--steps", "2"]);
        ok(icdit_env(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[("RANK", rank), ("WORLD_SIZE", "3")]));
    }
    ok(merge(&root.join("ranks.npz"), &[&dir]));
    assert_eq!(arr0(&root.join("ranks.npz")).0, [6, 32, 32, 3]);

    #[allow(clippy::type_complexity)]
    let bad: &[(&[(&str, &str)], &[&str], &str)] = &[
        (&[("RANK", "abc"), ("WORLD_SIZE", "2")], &[], "RANK=`abc`"),
        (&[("RANK", "2"), ("WORLD_SIZE", "2")], &[], "RANK=2 is not below the number of shards WORLD_SIZE=2"),
        (&[("RANK", "0")], &[], "WORLD_SIZE is not"),
        (&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "0")], &[], "SLURM_NTASKS=0"),
        (&[("SLURM_PROCID", "-1"), ("SLURM_NTASKS", "2")], &[], "SLURM_PROCID=`-1`"),
        (&[("JOB_COMPLETION_INDEX", "1")], &[], "--num-shards"),
        (&[("JOB_COMPLETION_INDEX", "3")], &["--num-shards", "3"], "JOB_COMPLETION_INDEX=3"),
        (&[("ICDIT_NUM_SHARDS", "3")], &[], "no shard index"),
        (&[], &["--shard", "3", "--num-shards", "3"], "--shard 3"),
        (&[], &["--shard", "0", "--num-shards", "0"], "--num-shards 0"),
        (&[], &["--num-shards", "2"], "needs a shard index"),
    ];
    for (env, extra, words) in bad {
        let dir = root.join("bad");
        let a = sample_args(6, &dir, extra);
        let o = icdit_env(&a.iter().map(String::as_str).collect::<Vec<_>>(), env);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{env:?} {extra:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(words), "{env:?} {extra:?}: {err}");
        assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none(), "{env:?}: files written");
    }
}

#[test]
fn a_latent_model_shards_through_its_vae() {
    let root = TempDir::new("vae");
    let fixture = |rel: &str| s(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel));
    let (w, vae) = (fixture("hd72/official.safetensors"), fixture("vae/new"));
    let run = root.join("run");
    for i in ["0", "1"] {
        let a =
            sample_args(5, &run, &["--weights", &w, "--vae", &vae, "--steps", "2", "--shard", i, "--num-shards", "2"]);
        ok(icdit(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    let m = manifest(&run, 1, 2);
    assert!(m["settings"]["vae"].as_str().is_some_and(|v| v.starts_with("fnv1a64:")), "{}", m["settings"]);
    assert_eq!(m["settings"]["image_hwc"], serde_json::json!([32, 32, 3]));
    let out = root.join("vae.npz");
    ok(merge(&out, &[&run]));
    let (shape, px) = arr0(&out);
    assert_eq!(shape, [5, 32, 32, 3]);
    // The same images as one plain `sample` of the same labels through the VAE.
    let plain = root.join("plain.npz");
    let o = icdit(&[
        "sample",
        "--weights",
        &w,
        "--vae",
        &vae,
        "--random-classes",
        "5",
        "--steps",
        "2",
        "--seed",
        "3",
        "--npz",
        &s(&plain),
    ]);
    ok(o);
    assert!(arr0(&plain).1 == px, "sharded VAE run differs from the plain one");
    // Without the VAE the run is refused: there are no images to write.
    let a = sample_args(5, &root.join("novae"), &["--weights", &w]);
    let o = icdit(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--vae"), "{}", stderr(&o));
}

#[test]
fn ctrl_c_stops_a_shard_between_steps_and_it_resumes() {
    let root = TempDir::new("sigint");
    let run = root.join("run");
    let out = s(&run);
    let args = [
        "sample",
        "--num-images",
        "6",
        "--steps",
        "20",
        "--seed",
        "5",
        "--batch",
        "1",
        "--threads",
        "1",
        "--out",
        &out,
    ];
    let child = command(&args, &[]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while parts_done(&run) < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: shard 0 of 1") && err.contains("the same command resumes"), "{err}");
    let m = manifest(&run, 0, 1);
    assert_eq!(m["done"], false);
    let kept = m["parts"].as_array().unwrap().len() as u64;
    assert!(hidden(&run).is_empty(), "{:?}", hidden(&run));
    let mut a = args.to_vec();
    a.push("--json");
    let r = json(&ok(command(&a, &[]).output().unwrap()));
    assert_eq!((r["skipped"].as_u64(), r["sampled"].as_u64()), (Some(kept), Some(6 - kept)));
}

/// Parts a running shard's manifest lists (0 before it exists).
fn parts_done(run: &Path) -> usize {
    std::fs::read(run.join("shard-00000-of-00001.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map_or(0, |m| m["parts"].as_array().map_or(0, Vec::len))
}

/// The hd72 fixture model (DiT with head dim 72, 2 blocks, 8×8 latents) and the small VAE:
/// the GPU pipeline under emulation samples it in a fraction of a second.
fn emu_model() -> Vec<String> {
    let fixture = |rel: &str| s(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel));
    let mut a: Vec<String> = ["--weights", "hd72/official.safetensors", "--vae", "vae/new"]
        .chunks(2)
        .flat_map(|f| [f[0].to_string(), fixture(f[1])])
        .collect();
    a.extend(["--backend", "emu"].map(String::from));
    a
}

/// A `--num-images` run of the fixture model on the emulation: 3 steps, 2 images per part.
fn run_emu(n: u64, dir: &Path, extra: &[&str]) -> Output {
    let model = emu_model();
    let mut e: Vec<&str> = model.iter().map(String::as_str).collect();
    e.extend(["--steps", "3", "--batch", "2"]);
    e.extend(extra);
    run_sample(n, dir, &e)
}

/// The part files of a run folder by name: their size and `arr_0` (the files' bytes differ
/// only in the zip header's modification time).
#[allow(clippy::type_complexity)]
fn part_files(dir: &Path) -> BTreeMap<String, (u64, (Vec<u64>, Vec<u8>))> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("part-"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, (std::fs::metadata(&p).unwrap().len(), arr0(&p)))
        })
        .collect()
}

#[test]
fn several_devices_write_what_one_device_writes_byte_for_byte() {
    let t = Instant::now();
    let root = TempDir::new("devices");
    let (one, two) = (root.join("one"), root.join("two"));
    // 7 images in parts of 2: 0..2, 2..4, 4..6 and a smaller last one, 6..7.
    ok(run_emu(7, &one, &["--devices", "0", "--png"]));
    // Two emulated devices, stopped after two parts (a time-limited job), then resumed.
    let o = ok(run_emu(7, &two, &["--devices", "1,0", "--png", "--max-parts", "2", "--json"]));
    let r = json(&o);
    assert_eq!((r["sampled"].as_u64(), r["done"].as_bool()), (Some(4), Some(false)), "{}", stderr(&o));
    assert!(stderr(&o).contains("2 devices (emu 1, 0): one worker thread and engine each"), "{}", stderr(&o));
    let by_device = |r: &serde_json::Value| -> u64 {
        r["parts_by_device"].as_array().unwrap().iter().map(|p| p["parts"].as_u64().unwrap()).sum()
    };
    assert_eq!(by_device(&r), 2);
    let o = ok(run_emu(7, &two, &["--devices", "0,1", "--png", "--json"]));
    let r = json(&o);
    assert_eq!((r["skipped"].as_u64(), r["sampled"].as_u64(), r["done"].as_bool()), (Some(4), Some(3), Some(true)));
    assert_eq!((r["devices"].clone(), by_device(&r)), (serde_json::json!([0, 1]), 2));
    println!("{}", stderr(&o));

    // Same part files (names, sizes, arrays), PNGs, manifest entries and merged output.
    let (a, b) = (part_files(&one), part_files(&two));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a == b, "part files differ between one and two devices");
    assert!(files(&one.join("images")) == files(&two.join("images")), "PNGs differ");
    assert_eq!(manifest(&one, 0, 1)["parts"], manifest(&two, 0, 1)["parts"]);
    let (x, y) = (root.join("one.npz"), root.join("two.npz"));
    ok(merge(&x, &[&one]));
    ok(merge(&y, &[&two]));
    let (shape, pixels) = arr0(&x);
    assert_eq!(shape, [7, 32, 32, 3]);
    assert!(pixels.iter().any(|&p| p != pixels[0]), "pixels are not constant");
    assert!(std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(), "merged .npz files differ");
    for d in [&one, &two, &two.join("images")] {
        assert!(hidden(d).is_empty(), "{}: {:?}", d.display(), hidden(d));
    }
    eprintln!("--devices 0 vs 0,1 on the emulation: {:.2} s", t.elapsed().as_secs_f64());
}

#[test]
fn bad_device_lists_are_refused() {
    let t = Instant::now();
    let root = TempDir::new("bad-devices");
    let dir = root.join("run");
    #[allow(clippy::type_complexity)]
    let cases: &[(&[&str], &str)] = &[
        (&["--backend", "emu", "--devices", "0,0"], "device 0 is listed twice"),
        (&["--backend", "emu", "--devices", ""], "has an empty entry"),
        (&["--backend", "emu", "--devices", "0,,1"], "has an empty entry"),
        (&["--backend", "emu", "--devices", "0,gpu1"], "`gpu1` in `0,gpu1` is not a device ordinal"),
        (&["--devices", "0"], "is for the GPU backends"),
        (&["--backend", "cpu", "--devices", "0,1"], "is for the GPU backends"),
    ];
    for (extra, words) in cases {
        let o = run_sample(4, &dir, extra);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.starts_with("error: invalid --devices: ") && err.contains(words), "{extra:?}: {err}");
        assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none(), "{extra:?}: files written");
    }
    // Without --num-images there are no parts to hand out: one device only, for now.
    let o = icdit(&["sample", "--class", "1", "--backend", "emu", "--devices", "0,1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("several devices are for --num-images runs"), "{}", stderr(&o));
    // A device that cannot be opened (no CUDA build, no GPU, or no device 4096) stops the
    // run with a device error naming it; the other worker stops too.
    let o = run_sample(4, &dir, &["--backend", "cuda", "--devices", "0,4096", "--batch", "2"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("error: GPU ") && (err.contains("device 0: ") || err.contains("device 4096")), "{err}");
    println!("{err}");
    eprintln!("bad device lists: {:.2} s", t.elapsed().as_secs_f64());
}

#[test]
fn one_listed_device_serves_a_plain_sample_run() {
    // Without --num-images, --devices picks the GPU; an emulated device 3 is a device like 0.
    let root = TempDir::new("plain-device");
    let model = emu_model();
    let mut npz = Vec::new();
    for d in ["0", "3"] {
        let out = root.join(format!("device{d}.npz"));
        let mut a: Vec<&str> = vec!["sample", "--random-classes", "3", "--seed", "3", "--steps", "3", "--devices", d];
        a.extend(model.iter().map(String::as_str));
        let out_s = s(&out);
        a.extend(["--npz", &out_s]);
        ok(icdit(&a));
        npz.push(arr0(&out));
    }
    assert!(npz[0] == npz[1], "device 3 differs from device 0");
}

#[test]
fn ctrl_c_stops_every_device_and_the_shard_resumes() {
    let t = Instant::now();
    let root = TempDir::new("devices-sigint");
    let run = root.join("run");
    let model = emu_model();
    let out = s(&run);
    let mut args: Vec<&str> = vec!["sample", "--num-images", "5", "--out", &out, "--seed", "5", "--threads", "1"];
    args.extend(model.iter().map(String::as_str));
    // Slow enough to interrupt part-way: 12 steps, one image per part.
    args.extend(["--steps", "12", "--batch", "1", "--devices", "0,1"]);
    let child = command(&args, &[]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while parts_done(&run) < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: shard 0 of 1") && err.contains("the same command resumes"), "{err}");
    let m = manifest(&run, 0, 1);
    assert_eq!(m["done"], false, "the run finished before it could be interrupted; make it slower");
    let kept = m["parts"].as_array().unwrap().len() as u64;
    assert_eq!(part_files(&run).len() as u64, kept, "a part file the manifest does not list");
    assert!(hidden(&run).is_empty(), "{:?}", hidden(&run));
    args.push("--json");
    let r = json(&ok(command(&args, &[]).output().unwrap()));
    assert_eq!((r["skipped"].as_u64(), r["sampled"].as_u64()), (Some(kept), Some(5 - kept)));
    eprintln!("Ctrl-C with two devices, then resumed: {:.2} s", t.elapsed().as_secs_f64());
}
