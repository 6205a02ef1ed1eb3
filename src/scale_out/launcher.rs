//! Which shard this process is: `--shard/--num-shards`, or the launcher's environment —
//! torchrun (`RANK`/`WORLD_SIZE`), Slurm (`SLURM_PROCID`/`SLURM_NTASKS`), a Kubernetes
//! Indexed Job (`JOB_COMPLETION_INDEX`, count from `--num-shards` or `ICDIT_NUM_SHARDS`), or
//! `ICDIT_SHARD`/`ICDIT_NUM_SHARDS` — and which images a shard covers; and which GPUs of
//! this machine it samples on (`--devices`). Errors name the flag or variable to change, as
//! the command line spells them.

use crate::backend::Backend;
use crate::error::Error;

/// The GPUs of `--devices 0,1,…`: a non-empty list of distinct device ordinals, for a GPU
/// backend (`cuda`, or `emu`, where every ordinal is a separate emulated device).
pub fn parse_devices(list: &str, backend: Backend) -> Result<Vec<usize>, Error> {
    if backend == Backend::Cpu {
        return Err(Error::invalid(
            "--devices",
            format!(
                "`{list}` is for the GPU backends (--backend cuda, or --backend emu to check on the CPU); the CPU \
                 backend already uses every core (--threads): to use more machines or split the cores, run one \
                 process per shard (--shard/--num-shards or a launcher)"
            ),
        ));
    }
    let mut devices = Vec::new();
    for entry in list.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(Error::invalid(
                "--devices",
                format!("`{list}` has an empty entry; expected device ordinals such as 0,1,2,3"),
            ));
        }
        let d: usize = entry.parse().map_err(|_| {
            Error::invalid("--devices", format!("`{entry}` in `{list}` is not a device ordinal (0, 1, 2, …)"))
        })?;
        if devices.contains(&d) {
            return Err(Error::invalid(
                "--devices",
                format!("device {d} is listed twice in `{list}`; list each device once"),
            ));
        }
        devices.push(d);
    }
    Ok(devices)
}

/// The device a run without `--num-images` samples on: the one `list` names (it has no
/// parts to hand out to several).
pub fn one_device(list: &str, backend: Backend) -> Result<usize, Error> {
    match parse_devices(list, backend)?[..] {
        [d] => Ok(d),
        ref several => Err(Error::invalid(
            "--devices",
            format!(
                "`{list}`: several devices are for --num-images runs (their part files are handed out to the \
                 devices); a run without --num-images samples on one device for now: pass one, e.g. --devices {}",
                several[0]
            ),
        )),
    }
}

/// Shard i of s: images ⌊in/s⌋..⌊(i+1)n/s⌋ (sizes differ by at most one).
pub fn shard_range(n: u64, i: u64, s: u64) -> (u64, u64) {
    let at = |k: u64| (n as u128 * k as u128 / s as u128) as u64;
    (at(i), at(i + 1))
}

/// A resolved shard and where it came from, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardChoice {
    pub index: u64,
    pub count: u64,
    pub source: String,
}

/// Refuses a run of no images.
pub fn check_num_images(num_images: u64) -> Result<(), Error> {
    if num_images == 0 {
        return Err(Error::invalid("--num-images", "must be at least 1"));
    }
    Ok(())
}

/// This process's shard of a `num_images`-image run: [`resolve_shard`], after
/// [`check_num_images`] (in this order, so the first error is the one the command reports).
pub fn shard_of_run(
    num_images: u64,
    flag_index: Option<u64>,
    flag_count: Option<u64>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ShardChoice, Error> {
    check_num_images(num_images)?;
    resolve_shard(flag_index, flag_count, env)
}

/// Index variables in priority order, each with the count variable that goes with it.
/// torchrun's come before Slurm's: `srun torchrun …` sets both, and RANK is the finer one.
const LAUNCHERS: [(&str, &str, &str); 4] = [
    ("ICDIT_SHARD", "ICDIT_NUM_SHARDS", "icdit"),
    ("RANK", "WORLD_SIZE", "torchrun"),
    ("SLURM_PROCID", "SLURM_NTASKS", "Slurm"),
    ("JOB_COMPLETION_INDEX", "ICDIT_NUM_SHARDS", "Kubernetes Indexed Job"),
];

fn env_number(name: &str, value: &str) -> Result<u64, Error> {
    value.parse::<u64>().map_err(|_| {
        Error::invalid("shard", format!("environment variable {name}=`{value}` is not a whole number ≥ 0"))
    })
}

/// Picks the shard: flags first, then the launcher's environment (`env` looks a variable
/// up), else unsharded. Every inconsistency is an error naming the flag or variable.
pub fn resolve_shard(
    flag_index: Option<u64>,
    flag_count: Option<u64>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ShardChoice, Error> {
    // (value, how to name it in messages, the launcher's count variable and name)
    type Index = (u64, String, Option<(&'static str, &'static str)>);
    let index: Option<Index> = match flag_index {
        Some(i) => Some((i, format!("--shard {i}"), None)),
        None => LAUNCHERS
            .iter()
            .find_map(|&(iv, cv, who)| env(iv).map(|v| (iv, v, cv, who)))
            .map(|(iv, v, cv, who)| Ok::<_, Error>((env_number(iv, &v)?, format!("{iv}={v}"), Some((cv, who)))))
            .transpose()?,
    };
    let Some((index, index_src, launcher)) = index else {
        if let Some(s) = flag_count {
            return Err(Error::invalid(
                "shard",
                format!(
                    "--num-shards {s} needs a shard index: pass --shard I, or run under a launcher that sets \
                     RANK, SLURM_PROCID or JOB_COMPLETION_INDEX"
                ),
            ));
        }
        if let Some(v) = env("ICDIT_NUM_SHARDS") {
            return Err(Error::invalid(
                "shard",
                format!("ICDIT_NUM_SHARDS={v} is set but no shard index is (ICDIT_SHARD or JOB_COMPLETION_INDEX)"),
            ));
        }
        return Ok(ShardChoice { index: 0, count: 1, source: "unsharded".into() });
    };
    let (count, count_src) = match (flag_count, launcher) {
        (Some(s), _) => (s, format!("--num-shards {s}")),
        (None, Some((cv, who))) => match env(cv) {
            Some(v) => (env_number(cv, &v)?, format!("{cv}={v}")),
            None => {
                return Err(Error::invalid(
                    "shard",
                    format!("{index_src} is set ({who}) but {cv} is not: pass --num-shards S (or set {cv})"),
                ))
            }
        },
        (None, None) => match env("ICDIT_NUM_SHARDS") {
            Some(v) => (env_number("ICDIT_NUM_SHARDS", &v)?, format!("ICDIT_NUM_SHARDS={v}")),
            None => return Err(Error::invalid("shard", format!("{index_src} needs --num-shards S"))),
        },
    };
    if count == 0 {
        return Err(Error::invalid("shard", format!("{count_src}: the number of shards must be at least 1")));
    }
    if index >= count {
        return Err(Error::invalid(
            "shard",
            format!("shard index {index_src} is not below the number of shards {count_src}"),
        ));
    }
    let source = match launcher {
        Some((_, who)) => format!("{who}: {index_src}, {count_src}"),
        None => format!("{index_src}, {count_src}"),
    };
    Ok(ShardChoice { index, count, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn ranges_tile_the_run() {
        for (n, s) in [(30, 3), (10, 4), (3, 5), (50_000, 8), (1, 1)] {
            let mut at = 0;
            for i in 0..s {
                let (a, b) = shard_range(n, i, s);
                assert_eq!(a, at);
                assert!(b - a <= n / s + 1);
                at = b;
            }
            assert_eq!(at, n);
        }
    }

    #[test]
    fn device_lists() {
        assert_eq!(parse_devices("0,1, 3", Backend::Cuda).unwrap(), [0, 1, 3]);
        assert_eq!(parse_devices("5", Backend::Emu).unwrap(), [5]);
        for (list, backend, words) in [
            ("0", Backend::Cpu, "GPU backends"),
            ("", Backend::Cuda, "empty entry"),
            ("0,,1", Backend::Cuda, "empty entry"),
            ("0,", Backend::Emu, "empty entry"),
            ("0,x", Backend::Cuda, "`x` in `0,x` is not a device ordinal"),
            ("-1", Backend::Cuda, "not a device ordinal"),
            ("1,0,1", Backend::Emu, "device 1 is listed twice"),
        ] {
            let e = parse_devices(list, backend).unwrap_err().to_string();
            assert!(e.contains("--devices") && e.contains(words), "{list:?}: {e}");
        }
    }

    #[test]
    fn shard_sources_in_priority_order() {
        let pick = |fi, fc, vars: &[(&str, &str)]| resolve_shard(fi, fc, &env_of(vars));
        assert_eq!(pick(None, None, &[]).unwrap().count, 1);
        let c = pick(None, None, &[("RANK", "2"), ("WORLD_SIZE", "4"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]);
        assert_eq!((c.as_ref().unwrap().index, c.unwrap().count), (2, 4));
        let c = pick(Some(1), Some(3), &[("RANK", "2"), ("WORLD_SIZE", "4")]).unwrap();
        assert_eq!((c.index, c.count), (1, 3));
        let c = pick(None, Some(8), &[("JOB_COMPLETION_INDEX", "7")]).unwrap();
        assert_eq!((c.index, c.count), (7, 8));
        let c = pick(None, None, &[("JOB_COMPLETION_INDEX", "7"), ("ICDIT_NUM_SHARDS", "9")]).unwrap();
        assert_eq!((c.index, c.count), (7, 9));
        for (fi, fc, vars, words) in [
            (None, None, &[("RANK", "x1"), ("WORLD_SIZE", "2")][..], "RANK=`x1`"),
            (None, None, &[("RANK", "2"), ("WORLD_SIZE", "2")][..], "RANK=2"),
            (None, None, &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "0")][..], "SLURM_NTASKS=0"),
            (None, None, &[("JOB_COMPLETION_INDEX", "3")][..], "--num-shards"),
            (None, Some(2), &[][..], "needs a shard index"),
            (Some(0), None, &[][..], "--num-shards"),
            (Some(3), Some(3), &[][..], "--shard 3"),
        ] {
            let e = pick(fi, fc, vars).unwrap_err().to_string();
            assert!(e.contains(words), "{vars:?}: {e}");
        }
    }
}
