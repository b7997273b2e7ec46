//! The in-place tar index on arbitrary bytes (a whole `.nemo`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = steerlm_convert::container::tar::index(data, "fuzz");
});
