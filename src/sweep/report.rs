//! The sweep's files: JSONL records appended as cells finish, CSV copies and PNG plots.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::format::write_atomic;
use crate::{Error, Result};

/// One cell's result (a line of `cells.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    /// `method|r=..|scaling|lr=..`.
    pub key: String,
    /// The method.
    pub method: String,
    /// The rank.
    pub rank: usize,
    /// The scaling strategy's name.
    pub scaling: String,
    /// The factor `s` it gave.
    pub scale: f64,
    /// The learning rate.
    pub lr: f64,
    /// Steps completed.
    pub steps: usize,
    /// Mean training loss of the last 10% of steps (`None` if the cell diverged).
    pub final_loss: Option<f64>,
    /// Loss on the held-out sequences after training.
    pub eval_loss: Option<f64>,
    /// Mean adapter-gradient norm at step 1: every cell starts from the same base model and
    /// data, so this compares the scalings at one state (rsLoRA's analysis).
    pub first_grad_norm: Option<f64>,
    /// Mean adapter-gradient norm over all steps.
    pub mean_grad_norm: Option<f64>,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Mean seconds per optimizer step.
    pub step_time_s: f64,
    /// Peak heap above the resting state during the cell, in bytes (needs the counting allocator).
    pub peak_heap_bytes: Option<usize>,
    /// Time outside training steps and evaluation (adapter setup, logging, files) as a fraction
    /// of the training time.
    pub harness_overhead: f64,
    /// Why the cell stopped early (a non-finite loss), if it did.
    pub diverged: Option<String>,
}

/// One step of one cell (a line of `steps.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The cell's key.
    pub cell: String,
    /// The step (1-based).
    pub step: usize,
    /// Training loss.
    pub loss: f64,
    /// Mean L2 norm of the adapter's gradient tensors.
    pub mean_grad_norm: f64,
}

pub(super) fn append_jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text += &serde_json::to_string(r)?;
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
}

/// Cuts a last line without its newline (a write that an interruption cut short) from a file
/// this module appends to, so that the next record starts on a line of its own.
pub(super) fn drop_partial_line(path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    if text.is_empty() || text.ends_with('\n') {
        return Ok(());
    }
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    write_atomic(path, complete.as_bytes())
}

/// The records of a file this module appends to. A last line without its newline is a write that
/// an interruption cut short: it is ignored (its cell is run again).
fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::Config { path: path.to_path_buf(), reason: format!("line {}: {e}", i + 1) })
        })
        .collect()
}

/// The finished cells recorded in `dir/cells.jsonl` (none if the file does not exist).
pub fn read_cells(dir: &Path) -> Result<Vec<CellResult>> {
    read_jsonl(&dir.join("cells.jsonl"))
}

/// Drops the step records of cells that did not finish (an interrupted run's last cell).
pub(super) fn keep_steps_of(dir: &Path, finished: &BTreeSet<String>) -> Result<()> {
    let path = dir.join("steps.jsonl");
    let steps: Vec<StepRecord> = read_jsonl(&path)?;
    let kept: Vec<&StepRecord> = steps.iter().filter(|s| finished.contains(&s.cell)).collect();
    if kept.len() == steps.len() {
        return Ok(());
    }
    let mut text = String::new();
    for s in kept {
        text += &serde_json::to_string(s)?;
        text.push('\n');
    }
    write_atomic(&path, text.as_bytes())
}

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v}"))
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Writes `cells.csv`, `steps.csv` and (with the `plot` feature) the three plots for `cells`.
pub fn write_reports(dir: &Path, cells: &[CellResult]) -> Result<()> {
    let mut csv = String::from(
        "method,rank,scaling,scale,lr,steps,final_loss,eval_loss,first_grad_norm,mean_grad_norm,trainable_params,step_time_s,\
         peak_heap_mib,harness_overhead,diverged\n",
    );
    for c in cells {
        csv += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{:.4},{},{:.4},{}\n",
            quoted(&c.method),
            c.rank,
            quoted(&c.scaling),
            c.scale,
            c.lr,
            c.steps,
            opt(c.final_loss),
            opt(c.eval_loss),
            opt(c.first_grad_norm),
            opt(c.mean_grad_norm),
            c.trainable_params,
            c.step_time_s,
            c.peak_heap_bytes.map_or(String::new(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64)),
            c.harness_overhead,
            quoted(c.diverged.as_deref().unwrap_or("")),
        );
    }
    write_atomic(&dir.join("cells.csv"), csv.as_bytes())?;

    let keys: BTreeSet<&str> = cells.iter().map(|c| c.key.as_str()).collect();
    let steps: Vec<StepRecord> = read_jsonl::<StepRecord>(&dir.join("steps.jsonl"))?
        .into_iter()
        .filter(|s| keys.contains(s.cell.as_str()))
        .collect();
    let mut csv = String::from("cell,step,loss,mean_grad_norm\n");
    for s in &steps {
        csv += &format!("{},{},{},{}\n", quoted(&s.cell), s.step, s.loss, s.mean_grad_norm);
    }
    write_atomic(&dir.join("steps.csv"), csv.as_bytes())?;
    plots(dir, cells, &steps)
}

#[cfg(feature = "plot")]
fn plots(dir: &Path, cells: &[CellResult], steps: &[StepRecord]) -> Result<()> {
    use crate::plot::{moving_average, LineChart, Scale, Series};
    use std::collections::BTreeMap;
    if cells.is_empty() {
        return Ok(());
    }
    // Final loss against rank: one line per (method, scaling, lr).
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for c in cells {
        if let Some(loss) = c.final_loss {
            let name = format!("{} {} lr={}", c.method, c.scaling, c.lr);
            lines.entry(name).or_default().push((c.rank as f64, loss));
        }
    }
    let series: Vec<Series> = lines.into_iter().map(|(name, points)| Series { name, points }).collect();
    let chart = |title, x_label, y_label, x_scale, y_scale| LineChart { title, x_label, y_label, x_scale, y_scale };
    if !series.is_empty() {
        chart("Final training loss (mean of the last 10% of steps)", "rank", "loss", Scale::Log, Scale::Linear)
            .write_png(&dir.join("final_loss_vs_rank.png"), &series)?;
    }
    // Per-step curves, one line per cell; losses smoothed over 10 steps.
    let by_cell = |f: fn(&StepRecord) -> f64, window: usize| -> Vec<Series> {
        cells
            .iter()
            .map(|c| {
                let ys: Vec<f64> = steps.iter().filter(|s| s.cell == c.key).map(f).collect();
                let points = (1..=ys.len()).map(|s| s as f64).zip(moving_average(&ys, window)).collect();
                Series { name: format!("r={} {}", c.rank, c.scaling), points }
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let loss = by_cell(|s| s.loss, 10);
    if !loss.is_empty() {
        chart("Training loss (moving average of 10 steps)", "step", "loss", Scale::Linear, Scale::Linear)
            .write_png(&dir.join("loss_vs_step.png"), &loss)?;
        chart("Mean L2 norm of the adapter gradients", "step", "gradient norm", Scale::Linear, Scale::Log)
            .write_png(&dir.join("grad_norm_vs_step.png"), &by_cell(|s| s.mean_grad_norm, 1))?;
    }
    Ok(())
}

#[cfg(not(feature = "plot"))]
fn plots(_dir: &Path, _cells: &[CellResult], _steps: &[StepRecord]) -> Result<()> {
    tracing::warn!("built without the `plot` feature: no PNG plots (the CSV and JSONL files are written)");
    Ok(())
}

/// A Markdown table of the cells: rank, scaling, factor, final and eval loss, gradient norms,
/// step time, peak heap.
pub fn summary_table(cells: &[CellResult]) -> String {
    let mut t = String::from(
        "| method | scaling | lr | rank | s | final loss | eval loss | grad norm, step 1 | grad norm, mean | params | s/step | peak heap (MiB) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let f = |v: Option<f64>, digits: usize| v.map_or("diverged".to_string(), |v| format!("{v:.digits$}"));
    for c in cells {
        t += &format!(
            "| {} | {} | {} | {} | {:.4} | {} | {} | {} | {} | {} | {:.3} | {} |\n",
            c.method,
            c.scaling,
            c.lr,
            c.rank,
            c.scale,
            f(c.final_loss, 4),
            f(c.eval_loss, 4),
            f(c.first_grad_norm, 5),
            f(c.mean_grad_norm, 5),
            c.trainable_params,
            c.step_time_s,
            c.peak_heap_bytes.map_or("n/a".into(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64)),
        );
    }
    t
}
