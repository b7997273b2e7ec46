//! The safe pickle VM on arbitrary bytes read as a `torch.distributed.checkpoint`
//! `.metadata` file: it must load or fail, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = steerlm_convert::torch::pickle::load_dcp_metadata(data, "fuzz");
    let _ = steerlm_convert::torch::pickle::load_tensor(data, "fuzz");
});
