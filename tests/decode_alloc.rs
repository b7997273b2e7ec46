//! Decoding allocates nothing per token: after a warm-up, decode steps of float, int8
//! (with and without `--int8-activations`) and tensor-parallel bf16 models (with and
//! without `--bf16-activations`), over short and
//! long contexts (both attention paths), make no heap allocation on any thread. A
//! counting global allocator sees every allocation of the process.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use common::*;
use steerlm_convert::container::mapped::OpenOptions;
use steerlm_convert::runtime::llama::Acts;
use steerlm_convert::runtime::load::Model;

struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ON.load(Relaxed) {
            COUNT.fetch_add(1, Relaxed);
        }
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if ON.load(Relaxed) {
            COUNT.fetch_add(1, Relaxed);
        }
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Allocations made by 8 decode steps after a prompt of `prompt` tokens and 2 warm-up
/// steps, on `pool`'s threads. One pool serves every case: the threads of a pool dropped
/// earlier exit when the system schedules them, and a thread's exit allocates (its
/// crossbeam-epoch handle hands its last garbage to the global queue), which under load
/// fell inside a later case's count.
fn allocations(pool: &rayon::ThreadPool, path: &Path, prompt: usize, acts: Acts) -> usize {
    let mut m = Model::open(path, &OpenOptions::default()).unwrap();
    m.weights.acts = acts;
    pool.install(|| {
        let w = &m.weights;
        let ids: Vec<u32> = (0..prompt as u32).map(|i| 1 + i * 7 % 200).collect();
        let mut cache = w.new_cache();
        cache.reserve(prompt + 16);
        let mut logits = vec![0f32; w.dims.vocab];
        w.forward_into(&m.archive, &mut cache, &ids, &mut logits);
        let mut next = 5u32;
        for _ in 0..2 {
            w.forward_into(&m.archive, &mut cache, &[next], &mut logits);
            next = argmax(&logits);
        }
        COUNT.store(0, Relaxed);
        ON.store(true, Relaxed);
        for _ in 0..8 {
            w.forward_into(&m.archive, &mut cache, &[next], &mut logits);
            next = argmax(&logits);
        }
        ON.store(false, Relaxed);
        COUNT.load(Relaxed)
    })
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn decode_steps_allocate_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = fixtures().join("models/gqa/hf");
    let int8 = tmp.path().join("int8");
    let g32 = tmp.path().join("g32");
    for (out, extra) in [
        (&int8, &[][..]),
        (&g32, &["--granularity", "group", "--group-size", "32"][..]),
    ] {
        let (code, _, err) = run(&[
            &[
                "quantize",
                hf.to_str().unwrap(),
                out.to_str().unwrap(),
                "-q",
            ][..],
            &["--scheme", "int8", "--device", "cpu"],
            extra,
        ]
        .concat());
        assert_eq!(code, 0, "{err}");
    }
    let tp2 = fixtures().join("archives/gqa_mcore_tp2_bf16.nemo");
    let exact = Acts::default();
    let a8 = Acts {
        int8: true,
        bf16: false,
    };
    let b16 = Acts {
        int8: false,
        bf16: true,
    };
    let cases: [(&Path, usize, Acts); 8] = [
        (&hf, 3, exact),
        (&hf, 300, exact),
        (&tp2, 3, exact),
        (&tp2, 3, b16),
        (&tp2, 300, b16),
        (&int8, 3, exact),
        (&int8, 3, a8),
        (&g32, 300, exact),
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // Every worker of this pool, and of rayon's global pool (opening a model maps its
    // files in parallel there), has started: a starting thread allocates its own queues,
    // and under load one started inside a count.
    pool.broadcast(|_| ());
    rayon::broadcast(|_| ());
    for (path, prompt, acts) in cases {
        let n = allocations(&pool, path, prompt, acts);
        assert_eq!(
            n,
            0,
            "{} after {prompt} tokens ({acts:?}): {n} allocations in 8 decode steps",
            path.display()
        );
    }
}
