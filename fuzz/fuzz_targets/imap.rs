#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| quill_node::fuzz::imap(data));
