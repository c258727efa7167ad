//! HF PEFT's on-disk format: a directory with `adapter_config.json` and
//! `adapter_model.safetensors`, tensors keyed `base_model.model.<module path>.<suffix>`
//! (e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
//!
//! Files are written to a temporary name in the same directory, synced, renamed into place and
//! the directory synced, so an interrupted save (a killed process, a power cut) never leaves a
//! half-written file where a good one was.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// The config file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before a module path.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The PEFT key of tensor `suffix` of the module at `path`.
pub fn peft_key(path: &str, suffix: &str) -> String {
    format!("{KEY_PREFIX}{path}.{suffix}")
}

/// Reads every tensor of a safetensors file onto `device`. A truncated or corrupt file is an
/// [`Error::Safetensors`] naming the file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st_err = |reason: String| Error::Safetensors { path: path.to_path_buf(), reason };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| st_err(e.to_string()))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = view.load(device).map_err(|e| st_err(format!("tensor `{name}`: {e}")))?;
            Ok((name, t))
        })
        .collect()
}

/// The shard files a `model.safetensors.index.json` maps its tensors to (its `weight_map`'s
/// values), sorted and without repeats. Errors name the file.
pub fn safetensors_index_files(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let bad = |reason: String| Error::Config { path: index.to_path_buf(), reason };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object (tensor name -> shard file)".into()))?;
    let mut files = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        match file.as_str() {
            Some(f) if !f.is_empty() && !f.contains("..") && !f.starts_with('/') => files.push(f.to_string()),
            _ => return Err(bad(format!("weight_map[\"{tensor}\"] is {file}; expected a shard file name"))),
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced to disk
/// before it is renamed into place (and the rename synced by syncing the directory). On an error
/// (a full disk, ...) the temporary file is removed and what was at `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Syncs a directory's entries to disk (the names a rename or a new file put there), as a file's
/// `sync_all` does its contents. A no-op where directories cannot be opened as files (Windows).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    if cfg!(unix) {
        match std::fs::File::open(dir)?.sync_all() {
            // Some file systems cannot sync a directory; their renames are as durable as they get.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Removes the temporary files and directories that interrupted writes of this crate left in
/// `dir`: hidden names ending in `.tmp-<pid>` ([`write_atomic`]'s `.<name>.tmp-<pid>`, a
/// checkpoint's `.checkpoint-N.tmp-<pid>`) or `.tmp-<pid>-<n>.png` (a chart's); never a finished
/// file, nor another program's temporary file of another shape.
pub fn remove_interrupted_writes(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_interrupted_write(&name) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Whether `name` is one of this crate's temporary names (see [`remove_interrupted_writes`]).
fn is_interrupted_write(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some((stem, tail)) = name.rsplit_once(".tmp-") else { return false };
    let tail_ok = digits(tail)
        || tail.strip_suffix(".png").and_then(|t| t.split_once('-')).is_some_and(|(pid, n)| digits(pid) && digits(n));
    name.starts_with('.') && stem.len() > 1 && tail_ok
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `tensors` as a safetensors file at `path`, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.contiguous()))
        .map(|(k, t)| t.map(|t| (k, t)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::serialize(&map, None)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    write_atomic(path, &bytes)
}

/// The adapters that PEFT's multi-adapter layout keeps beside the default one in `dir`: every
/// subdirectory holding an `adapter_config.json`, with its name, in name order.
pub fn named_adapter_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(CONFIG_FILE).is_file())
        .filter_map(|p| Some((p.file_name()?.to_str()?.to_string(), p)))
        .collect();
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_crates_temporary_names_count_as_interrupted_writes() {
        for name in [".adapter_model.safetensors.tmp-123", ".checkpoint-7.tmp-42", ".loss.png.tmp-42-3.png"] {
            assert!(is_interrupted_write(name), "{name}");
        }
        for name in ["checkpoint-7", ".checkpoint-7.old-42", ".tmp-42", ".x.tmp-abc", "a.tmp-42", ".x.tmp-1-2.jpg"] {
            assert!(!is_interrupted_write(name), "{name}");
        }
    }

    #[test]
    fn round_trip_and_corrupt_files() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("t.safetensors");
        let t = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((2, 3))?;
        write_safetensors(&path, &[("a.weight".into(), t.clone())])?;
        let back = read_safetensors(&path, &Device::Cpu)?;
        assert_eq!(back["a.weight"].to_vec2::<f32>()?, t.to_vec2::<f32>()?);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert!(matches!(read_safetensors(&path, &Device::Cpu), Err(Error::Safetensors { .. })));
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        assert!(matches!(read_safetensors(&path, &Device::Cpu), Err(Error::Safetensors { .. })));
        assert!(matches!(read_safetensors(&dir.path().join("missing"), &Device::Cpu), Err(Error::Io { .. })));
        Ok(())
    }
}
