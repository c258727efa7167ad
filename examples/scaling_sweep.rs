//! The scaling sweep from Rust: alpha/r against alpha/sqrt(r) (and, with `--custom`, a strategy
//! of one's own, alpha / (1 + ln r)) across ranks, on the built-in model and data or a config's.
//!
//! ```text
//! cargo run --release --example scaling_sweep                          # the embedded default
//! cargo run --release --example scaling_sweep -- --custom --output target/sweep-custom
//! cargo run --release --example scaling_sweep -- --config configs/sweep-smollm2.json
//! ```
//! The same library code as `candle-peft sweep`; a rerun with the same `--output` resumes.

use std::path::PathBuf;

use candle_peft::scaling::ScalingStrategy;
use candle_peft::sweep::{summary_table, Sweep, SweepConfig};

#[global_allocator]
static ALLOC: candle_peft::alloc::Counting = candle_peft::alloc::Counting;

/// A user-defined strategy: `alpha / (1 + ln r)`, which shrinks more slowly than alpha/sqrt(r).
#[derive(Debug)]
struct LogRank;

impl ScalingStrategy for LogRank {
    fn name(&self) -> String {
        "alpha/(1+ln r)".into()
    }
    fn scale(&self, alpha: f64, rank: usize) -> f64 {
        alpha / (1.0 + (rank as f64).ln())
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    candle_peft::train::reuse_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let config = match arg(&args, "--config") {
        Some(path) => SweepConfig::from_file(path.as_ref())?,
        None => SweepConfig::builtin_default(),
    };
    let output = PathBuf::from(arg(&args, "--output").unwrap_or_else(|| "target/sweep".into()));
    let device = candle_peft::device(&arg(&args, "--device").unwrap_or_else(|| "auto".into()))?;
    let mut sweep = Sweep::new(config, device)?.with_progress(true);
    if args.iter().any(|a| a == "--custom") {
        sweep = sweep.with_strategy(LogRank);
    }
    let cells = sweep.run(&output)?;
    println!("{}", summary_table(&cells));
    println!("results in {}", output.display());
    Ok(())
}
