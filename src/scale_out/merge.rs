//! Merging: joins the shards of a run into the one `.npz` the ADM / guided-diffusion FID
//! evaluator reads — `arr_0`, uint8 (N, H, W, C), in image-index order — after checking that
//! the manifests agree on every setting, that all are finished and that their parts cover
//! 0..N exactly once. Parts are streamed into the output one at a time (memory stays at one
//! copy buffer), which is written under a temporary name and renamed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::launcher::shard_range;
use super::log::progress;
use super::manifest::{differences, manifest_name, manifests_in, Manifest};
use crate::error::Error;

/// What a merge wrote.
#[derive(Clone, Debug)]
pub struct MergeReport {
    pub num_images: u64,
    /// (H, W, C) of each image.
    pub image_hwc: [u64; 3],
    pub shards: usize,
    pub parts: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// A part file to copy, with the manifest that lists it.
struct Piece {
    first: u64,
    count: u64,
    path: PathBuf,
    manifest: PathBuf,
}

/// Merges the shards of one run into `out`. `inputs` are run folders (every
/// `shard-*-of-*.json` in them) or manifest files; the first manifest is the one the others'
/// settings are compared with.
pub fn merge<P: AsRef<Path>>(inputs: &[P], out: &Path) -> Result<MergeReport, Error> {
    let start = Instant::now();
    let inputs: Vec<&Path> = inputs.iter().map(AsRef::as_ref).collect();
    let paths = manifest_paths(&inputs)?;
    let manifests = paths.iter().map(|p| Manifest::read(p)).collect::<Result<Vec<_>, _>>()?;
    let (num_images, hwc) = agreed_settings(&paths, &manifests)?;
    check_finished(&paths, &manifests)?;
    let pieces = pieces_in_order(&inputs, &paths, &manifests, num_images)?;

    // Stream the parts into one stored (uncompressed) zip entry `arr_0.npy`.
    crate::fsio::check_writable_dir(out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    let per_image = hwc.iter().product::<u64>();
    let tmp = crate::fsio::temp_path(out)
        .ok_or_else(|| Error::invalid("--out", format!("{} has no file name", out.display())))?;
    let result = write_merged(&tmp, &pieces, num_images, &hwc, per_image)
        .and_then(|()| std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    let report = MergeReport {
        num_images,
        image_hwc: hwc,
        shards: manifests.len(),
        parts: pieces.len(),
        bytes: num_images * per_image,
        seconds: start.elapsed().as_secs_f64(),
    };
    progress(format!(
        "merged {num_images} images from {} shard{} ({} parts) into {} (arr_0 uint8 [{num_images}, {}, {}, {}], {:.1} MB) in {:.2} s",
        report.shards,
        if report.shards == 1 { "" } else { "s" },
        report.parts,
        out.display(),
        hwc[0],
        hwc[1],
        hwc[2],
        report.bytes as f64 / 1e6,
        report.seconds
    ));
    Ok(report)
}

/// The manifests the inputs name, in the order given, once each.
fn manifest_paths(inputs: &[&Path]) -> Result<Vec<PathBuf>, Error> {
    let mut paths = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let found = manifests_in(input)?;
            if found.is_empty() {
                return Err(Error::Config {
                    origin: input.display().to_string(),
                    reason: "no shard manifests (shard-IIIII-of-SSSSS.json) in this folder".into(),
                });
            }
            paths.extend(found);
        } else {
            paths.push(input.to_path_buf());
        }
    }
    let mut seen = std::collections::HashSet::new();
    paths.retain(|p| seen.insert(p.clone()));
    if paths.is_empty() {
        return Err(Error::invalid("merge", "no run folders or shard manifests to merge"));
    }
    Ok(paths)
}

/// The run's image count and (H, W, C), after checking that every manifest has the first
/// one's settings.
fn agreed_settings(paths: &[PathBuf], manifests: &[Manifest]) -> Result<(u64, [u64; 3]), Error> {
    let (first_path, first) = (&paths[0], &manifests[0]);
    for (p, m) in paths.iter().zip(manifests).skip(1) {
        let diff = differences(&first.settings, &m.settings);
        if !diff.is_empty() {
            return Err(Error::Config {
                origin: format!("{} and {}", first_path.display(), p.display()),
                reason: format!(
                    "shards made with different settings, refusing to merge (first file's value vs the \
                     second's): {}",
                    diff.join("; ")
                ),
            });
        }
    }
    let num_images = first.settings.get("num_images").and_then(|v| v.as_u64()).ok_or_else(|| Error::Config {
        origin: first_path.display().to_string(),
        reason: "settings have no `num_images`".into(),
    })?;
    let hwc: Vec<u64> = first
        .settings
        .get("image_hwc")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .filter(|v: &Vec<u64>| v.len() == 3)
        .ok_or_else(|| Error::Config {
            origin: first_path.display().to_string(),
            reason: "settings have no `image_hwc` [H, W, C]".into(),
        })?;
    Ok((num_images, [hwc[0], hwc[1], hwc[2]]))
}

/// Refuses shards that have not finished.
fn check_finished(paths: &[PathBuf], manifests: &[Manifest]) -> Result<(), Error> {
    let unfinished: Vec<String> = paths
        .iter()
        .zip(manifests)
        .filter(|(_, m)| !m.done)
        .map(|(p, m)| format!("{} ({} of {} images)", p.display(), m.images_done, m.range[1] - m.range[0]))
        .collect();
    if !unfinished.is_empty() {
        return Err(Error::Config {
            origin: unfinished.join(", "),
            reason: "unfinished shards: run them again (the same command resumes) before merging".into(),
        });
    }
    Ok(())
}

/// Every manifest's parts in image order, after checking that they cover 0..N exactly once.
fn pieces_in_order(
    inputs: &[&Path],
    paths: &[PathBuf],
    manifests: &[Manifest],
    num_images: u64,
) -> Result<Vec<Piece>, Error> {
    let mut pieces: Vec<Piece> = paths
        .iter()
        .zip(manifests)
        .flat_map(|(p, m)| {
            let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
            m.parts.iter().map(move |part| Piece {
                first: part.first,
                count: part.count,
                path: dir.join(&part.file),
                manifest: p.clone(),
            })
        })
        .collect();
    pieces.sort_by_key(|p| (p.first, p.count));
    let mut at = 0u64;
    let mut last: Option<&Piece> = None;
    for piece in &pieces {
        if piece.first > at {
            return Err(missing(inputs, at, piece.first, num_images, manifests));
        }
        // A part that starts before `at` overlaps the one before it.
        if let Some(prev) = last.filter(|_| piece.first < at) {
            return Err(Error::Config {
                origin: format!("{} and {}", prev.manifest.display(), piece.manifest.display()),
                reason: format!(
                    "images {}..{} are in two parts ({} and {}): shards of two different shardings?",
                    piece.first,
                    at.min(piece.first + piece.count),
                    prev.path.display(),
                    piece.path.display()
                ),
            });
        }
        at = piece.first + piece.count;
        last = Some(piece);
    }
    if at != num_images {
        return Err(missing(inputs, at, num_images, num_images, manifests));
    }
    Ok(pieces)
}

/// The error for images lo..hi that no part holds, naming the shards that should.
fn missing(inputs: &[&Path], lo: u64, hi: u64, n: u64, manifests: &[Manifest]) -> Error {
    let counts: Vec<u64> = manifests.iter().map(|m| m.num_shards).collect();
    let mut reason = format!("images {lo}..{hi} of {n} are in no part");
    if counts.iter().all(|&s| s == counts[0]) {
        let s = counts[0];
        let have: Vec<u64> = manifests.iter().map(|m| m.shard).collect();
        let absent: Vec<String> = (0..s)
            .filter(|i| !have.contains(i))
            .filter(|&i| {
                let (a, b) = shard_range(n, i, s);
                a < hi && b > lo
            })
            .map(|i| manifest_name(i, s))
            .collect();
        if !absent.is_empty() {
            reason.push_str(&format!(": missing shard manifests {}", absent.join(", ")));
        }
    }
    let origin = inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Error::Config { origin, reason }
}

/// The .npy header numpy writes (format 1.0): magic, version, length, then a dict padded
/// with spaces and a newline to a multiple of 64 bytes.
fn npy_header(shape: &[u64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let mut dict = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': ({}), }}", dims.join(", "));
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h
}

fn write_merged(tmp: &Path, pieces: &[Piece], n: u64, hwc: &[u64], per_image: u64) -> Result<(), Error> {
    use npyz::zip;
    let bad = |e: std::io::Error| Error::io(tmp, e);
    let zerr = |e: zip::result::ZipError| Error::io(tmp, std::io::Error::other(e.to_string()));
    let file = std::fs::File::create(tmp).map_err(bad)?;
    let mut z = zip::ZipWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let opts = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default()) // 1980-01-01: the same bytes for the same images
        .large_file(n * per_image >= u32::MAX as u64 / 2);
    z.start_file("arr_0.npy", opts).map_err(zerr)?;
    z.write_all(&npy_header(&[n, hwc[0], hwc[1], hwc[2]])).map_err(bad)?;
    for piece in pieces {
        copy_part(piece, hwc, per_image, &mut z, tmp)?;
    }
    let buf = z.finish().map_err(zerr)?;
    let file = buf.into_inner().map_err(|e| bad(e.into_error()))?;
    file.sync_all().map_err(bad)
}

/// Appends a part's pixels after checking its array is uint8 [count, H, W, C] in C order.
fn copy_part(piece: &Piece, hwc: &[u64], per_image: u64, out: &mut impl Write, tmp: &Path) -> Result<(), Error> {
    let path = &piece.path;
    let bad = |reason: String| Error::Config { origin: path.display().to_string(), reason };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive =
        npyz::zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(format!("not an .npz file: {e}")))?;
    let mut entry = archive.by_name("arr_0.npy").map_err(|e| bad(format!("no array `arr_0`: {e}")))?;
    let header = npyz::NpyHeader::from_reader(&mut entry).map_err(|e| bad(format!("bad .npy header: {e}")))?;
    let want = [piece.count, hwc[0], hwc[1], hwc[2]];
    let descr = match header.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => other.descr(),
    };
    if header.shape() != want || !matches!(descr.as_str(), "|u1" | "<u1" | ">u1") || header.order() != npyz::Order::C {
        return Err(bad(format!(
            "`arr_0` is {descr} {:?} ({:?} order), expected |u1 {want:?} (C order) as the manifest {} says",
            header.shape(),
            header.order(),
            piece.manifest.display()
        )));
    }
    let mut left = piece.count * per_image;
    let mut buf = vec![0u8; (1 << 20).min(left as usize).max(1)];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let got = entry.read(&mut buf[..want]).map_err(|e| Error::io(path, e))?;
        if got == 0 {
            return Err(bad(format!("`arr_0` ends {left} bytes early")));
        }
        out.write_all(&buf[..got]).map_err(|e| Error::io(tmp, e))?;
        left -= got as u64;
    }
    // Reading to the end makes the zip reader check the entry's CRC.
    let extra = entry.read(&mut buf).map_err(|e| Error::io(path, e))?;
    if extra != 0 {
        return Err(bad("`arr_0` holds more pixels than its shape".into()));
    }
    Ok(())
}
