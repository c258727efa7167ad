//! The fuzz targets' corpora (`fuzz/corpus/<target>/`, seeds and what libFuzzer kept) and the
//! minimized inputs of every crash fuzzing found (`fuzz/regressions/<target>/`), replayed through
//! the targets' bodies (`fuzz/src/lib.rs`) on the stable toolchain: each input gives a result,
//! never a panic; a regression input gives an error, in at most a few lines.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// The longest error message a malformed input may get: a paragraph, not a list of every key.
const MAX_MESSAGE: usize = 1500;

#[test]
fn every_fuzz_input_gives_an_error_or_a_model_never_a_panic() {
    // Errors as a user reads them: candle appends a backtrace to its errors under RUST_BACKTRACE=1.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failures = Vec::new();
    for (name, target) in harness::TARGETS {
        let (mut oks, mut errs) = (0, 0);
        for kind in ["corpus", "regressions"] {
            let dir = root.join(kind).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
            paths.sort();
            for path in paths {
                let data = std::fs::read(&path).unwrap();
                match catch_unwind(AssertUnwindSafe(|| target(&data))) {
                    Err(_) => failures.push(format!("{}: panicked", path.display())),
                    Ok(Ok(())) if kind == "regressions" => {
                        failures.push(format!("{}: a crash input was accepted; expected an error", path.display()))
                    }
                    Ok(Ok(())) => oks += 1,
                    Ok(Err(e)) => {
                        errs += 1;
                        let message = e.to_string();
                        if message.len() > MAX_MESSAGE {
                            failures.push(format!(
                                "{}: an error of {} characters (at most {MAX_MESSAGE}): {}...",
                                path.display(),
                                message.len(),
                                &message[..message.floor_char_boundary(300)]
                            ));
                        }
                    }
                }
            }
        }
        println!("{name}: {} inputs, {oks} loaded, {errs} refused", oks + errs);
        assert!(oks + errs > 0 || !failures.is_empty(), "no corpus for the fuzz target {name}");
    }
    assert!(failures.is_empty(), "{} inputs failed:\n{}", failures.len(), failures.join("\n"));
}
