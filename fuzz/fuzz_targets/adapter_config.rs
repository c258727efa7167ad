#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = candle_peft_fuzz::adapter_config(data);
});
