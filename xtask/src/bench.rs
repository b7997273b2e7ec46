//! `bench quantize` and the memory-bandwidth measure the benchmarks share.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use crate::{best_against_cp, flag, num, release_binary, runs, synth_if_absent};

/// Memory read bandwidth in GB/s with `threads` threads: the best of 3 passes of each of
/// four ways to sum a 1 GiB buffer (already in memory) with independent accumulators, the
/// hardware prefetcher alone, and with a software prefetch a page ahead into L1 or into L2
/// or four pages ahead into L2 (what the kernels do), so that the limit is the fastest read
/// this machine shows.
pub fn read_bandwidth(threads: usize) -> f64 {
    let n = 1usize << 27;
    let v: Vec<u64> = (0..n as u64).collect();
    let mut best = f64::MAX;
    for (ahead, l2) in [(0usize, false), (4096, false), (4096, true), (16384, true)] {
        for _ in 0..3 {
            let t = Instant::now();
            let chunk = n / threads;
            let total: u64 = std::thread::scope(|s| {
                let hs: Vec<_> = v
                    .chunks(chunk)
                    .map(|c| s.spawn(move || sum_lines(c, ahead, l2)))
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap())
                    .fold(0u64, u64::wrapping_add)
            });
            std::hint::black_box(total);
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    (n * 8) as f64 / best / 1e9
}

/// The wrapping sum of `c` a cache line at a time, asking for the line `ahead` bytes on
/// first (0: no software prefetch), into L2 only where `l2`.
fn sum_lines(c: &[u64], ahead: usize, l2: bool) -> u64 {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
    let _ = l2;
    let mut acc = [0u64; 8];
    for w in c.chunks_exact(8) {
        #[cfg(target_arch = "x86_64")]
        if ahead > 0 {
            let p = (w.as_ptr() as *const i8).wrapping_add(ahead);
            // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
            unsafe {
                if l2 {
                    _mm_prefetch::<_MM_HINT_T1>(p)
                } else {
                    _mm_prefetch::<_MM_HINT_T0>(p)
                }
            };
        }
        for l in 0..8 {
            acc[l] = acc[l].wrapping_add(w[l]);
        }
    }
    acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn gpu_present() -> bool {
    steerlm_convert::gpu::CudaEngine::open().is_ok()
}

pub fn quantize(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(flag(args, "--dir").unwrap_or("target/bench"));
    let layers = num(args, "--layers", 4)?;
    let bin = release_binary()?;
    let p = synth_if_absent(&dir, layers)?;
    let size = std::fs::metadata(&p)?.len();
    Command::new("cat")
        .arg(&p)
        .stdout(std::process::Stdio::null())
        .status()?;
    let shm = Path::new("/dev/shm");
    let mut devices = vec!["cpu"];
    if gpu_present() {
        devices.push("cuda");
    }
    println!(
        "{:<26} {:>7} {:>6} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8} {:>9} {:>9}",
        "archive",
        "scheme",
        "device",
        "output",
        "cp+sync s",
        "out GB",
        "ours s",
        "vs cp",
        "of limit",
        "GB/s in",
        "RSS"
    );
    for scheme in ["int8", "fp16"] {
        for device in &devices {
            for target in ["disk", "tmpfs"] {
                let out = if target == "disk" {
                    dir.join("quantized")
                } else if shm.is_dir() {
                    shm.join("steerlm-bench-quantized")
                } else {
                    continue;
                };
                let mut cmd = || {
                    let mut c = Command::new(&bin);
                    c.arg("quantize")
                        .arg(&p)
                        .arg(&out)
                        .args(["--scheme", scheme, "--device", device, "-q"]);
                    c
                };
                let a = best_against_cp(&p, &dir, &out, runs(args)?, &mut cmd)?;
                // The disk's limit only binds the disk rows.
                let of_limit = if target == "disk" {
                    format!("{:.0}%", 100.0 * a.disk_limit_s(size) / a.s)
                } else {
                    "-".into()
                };
                println!(
                    "{:<26} {:>7} {:>6} {:>9} {:>9.2} {:>8.2} {:>9.2} {:>8.2} {:>8} {:>9.2} {:>6.0} MB",
                    p.file_name().unwrap().to_string_lossy(),
                    scheme,
                    device,
                    target,
                    a.cp_s,
                    a.out_bytes as f64 / 1e9,
                    a.s,
                    a.s / a.cp_s,
                    of_limit,
                    size as f64 / 1e9 / a.s,
                    a.rss as f64 / 1e6
                );
            }
        }
    }
    // Measured after the runs: a child forked while this process holds the 1 GiB test
    // buffer would report it as its peak RSS.
    let bw1 = read_bandwidth(1);
    let bwn = read_bandwidth(threads());
    println!(
        "memory read bandwidth: {bw1:.1} GB/s (1 thread), {bwn:.1} GB/s ({} threads)",
        threads()
    );
    println!(
        "GB/s in = archive bytes / wall time of the whole command (open, quantize, write, fsync).\n\
         of limit = (out GB at the rate cp + sync wrote the archive) / ours s: the disk's limit\n\
         for an output of that size, as a fraction of the time taken (100% = at the disk's rate).\n\
         The tmpfs rows write the output to /dev/shm: the quantizer without the disk.\n\
         Against memory: the quantizer reads each input byte once and writes half (int8) or\n\
         all (fp16) of it; {bwn:.1} GB/s is this machine's read bandwidth."
    );
    Ok(())
}
