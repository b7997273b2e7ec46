//! The zip directory of a rank checkpoint, then the zip + pickle path together as the
//! converter runs it (a whole `model_weights.ckpt` member at archive offset 0).
#![no_main]

use libfuzzer_sys::fuzz_target;
use steerlm_convert::container::zip;
use steerlm_convert::torch::state_dict::StateDict;

fuzz_target!(|data: &[u8]| {
    let _ = zip::read_records(data, "fuzz");
    let _ = StateDict::read(data, 0, "fuzz");
});
