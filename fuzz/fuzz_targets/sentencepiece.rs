//! The SentencePiece `ModelProto` reader on arbitrary bytes (the `tokenizer.model` artifact).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = steerlm_convert::nemo::tokenizer::SpModel::parse(data, "fuzz");
});
