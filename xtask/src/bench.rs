//! `bench quantize` and the memory-bandwidth measure the benchmarks share.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use crate::{best_against_cp, flag, num, release_binary, runs, synth_if_absent};

/// A copy of some bytes in a file, read through a read-only shared mapping (the file is
/// removed at once; the mapping keeps its pages in the page cache, as a model's are).
pub struct MappedFile {
    p: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and lives as long as the value.
unsafe impl Sync for MappedFile {}
unsafe impl Send for MappedFile {}

impl std::ops::Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes are mapped at `p` until the value drops.
        unsafe { std::slice::from_raw_parts(self.p, self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: the mapping made by `map_copy`, unmapped once.
        unsafe { libc::munmap(self.p as *mut libc::c_void, self.len) };
    }
}

/// `bytes` written to a file in `dir` and mapped read-only ([`MappedFile`]).
pub fn map_copy(dir: &Path, bytes: &[u8]) -> Result<MappedFile> {
    use std::os::fd::AsRawFd;
    anyhow::ensure!(!bytes.is_empty(), "nothing to map");
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("mapped-{}.bin", std::process::id()));
    std::fs::write(&path, bytes)?;
    let file = std::fs::File::open(&path);
    std::fs::remove_file(&path)?;
    let file = file?;
    // SAFETY: a fresh read-only shared mapping of the whole file, checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes.len(),
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        anyhow::bail!(
            "mmap {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(MappedFile {
        p: p as *const u8,
        len: bytes.len(),
    })
}

/// Memory read bandwidth in GB/s with `threads` threads: the best of 3 passes of each of
/// four ways to sum 1 GiB with independent accumulators (the hardware prefetcher alone,
/// and with a software prefetch a page ahead into L1 or into L2 or four pages ahead into
/// L2, what the kernels do), over a buffer on the heap and over the same bytes mapped from
/// a file in target/bench (the page cache, as a model is read), so that the limit is the
/// fastest read this machine shows.
pub fn read_bandwidth(threads: usize) -> f64 {
    let n = 1usize << 27;
    let v: Vec<u64> = (0..n as u64).collect();
    let best = best_sum_seconds(&v, threads);
    // SAFETY (the cast): the mapping is page-aligned and holds the n u64 just written.
    let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, n * 8) };
    let mapped = map_copy(Path::new("target/bench"), bytes).map(|m| {
        let words = unsafe { std::slice::from_raw_parts(m.as_ptr() as *const u64, n) };
        best_sum_seconds(words, threads)
    });
    (n * 8) as f64 / best.min(mapped.unwrap_or(f64::MAX)) / 1e9
}

/// The fastest of [`read_bandwidth`]'s passes over `v`, in seconds.
fn best_sum_seconds(v: &[u64], threads: usize) -> f64 {
    let n = v.len();
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
    best
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
