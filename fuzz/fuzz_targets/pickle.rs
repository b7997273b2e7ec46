//! The safe pickle VM on arbitrary bytes: a `data.pkl` record must load or fail, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = steerlm_convert::torch::pickle::load_state_dict(data, "fuzz");
});
