//! `model_config.yaml` parsing and validation on arbitrary UTF-8 text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = steerlm_convert::nemo::config::ModelConfig::parse(text, "fuzz");
    }
});
