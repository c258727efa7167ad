//! The metadata of a llama.cpp GGUF file (model shape, tokenizer, chat template, ...), read
//! without its tensors, and the crate's one GGUF writer ([`write_gguf`]).
//!
//! This module sits below both [`crate::models`] (which builds a model from the `llama.*` keys)
//! and [`crate::tokenizer`] (which builds a tokenizer from the `tokenizer.ggml.*` keys): it
//! imports neither.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::{Error, Result};

/// The metadata of a GGUF file. Errors about a missing key or a value of the wrong type name
/// the file and the key.
#[derive(Debug, Clone)]
pub struct GgufMetadata {
    path: PathBuf,
    values: HashMap<String, Value>,
}

impl GgufMetadata {
    /// Reads only the metadata of a GGUF file (not its tensors).
    pub fn read(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = read_content(path, &mut file)?;
        Ok(Self::from_content(path, &content))
    }

    /// The metadata of a file already read (`content` of the GGUF file at `path`).
    pub fn from_content(path: &Path, content: &Content) -> Self {
        Self { path: path.to_path_buf(), values: content.metadata.clone() }
    }

    /// The file the metadata was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every key and value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether the file has `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    fn error(&self, reason: String) -> Error {
        Error::Config { path: self.path.clone(), reason }
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.values.get(key).ok_or_else(|| self.error(format!("the GGUF metadata has no `{key}`")))
    }

    fn typed<T>(&self, key: &str, convert: impl FnOnce(&Value) -> candle_core::Result<T>) -> Result<T> {
        convert(self.get(key)?).map_err(|e| self.error(format!("GGUF metadata `{key}`: {e}")))
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Result<String> {
        self.typed(key, |v| v.to_string().cloned())
    }

    /// An integer value (stored as u32).
    pub fn u32(&self, key: &str) -> Result<u32> {
        self.typed(key, Value::to_u32)
    }

    /// A boolean value.
    pub fn bool(&self, key: &str) -> Result<bool> {
        self.typed(key, Value::to_bool)
    }

    /// A float value (stored as f32).
    pub fn f32(&self, key: &str) -> Result<f32> {
        self.typed(key, Value::to_f32)
    }

    /// An array of integers (e.g. `tokenizer.ggml.token_type`).
    pub fn i32s(&self, key: &str) -> Result<Vec<i32>> {
        self.typed(key, |v| v.to_vec()?.iter().map(Value::to_i32).collect())
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.typed(key, |v| v.to_vec()?.iter().map(|s| s.to_string().cloned()).collect())
    }
}

/// A key or tensor name of a file as an error shows it: as it is when it is short and
/// printable, otherwise quoted with escapes and cut after 64 characters (a corrupt header's
/// "name" can be kilobytes of binary).
fn shown(name: &str) -> String {
    let cut: String = name.chars().take(64).collect();
    if cut.len() < name.len() {
        format!("{cut:?}... ({} bytes)", name.len())
    } else if name.chars().any(char::is_control) {
        format!("{name:?}")
    } else {
        cut
    }
}

/// Writes a GGUF file (version 2, as candle writes it; llama.cpp reads it) with `metadata` and
/// `tensors` in that order, atomically: to a temporary file, synced, then renamed over `path`.
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut bytes = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut bytes, &metadata, &tensors)
        .map_err(|e| Error::Config { path: path.to_path_buf(), reason: format!("writing a GGUF file: {e}") })?;
    crate::format::write_atomic(path, &bytes.into_inner())
}

/// Reads the header of a GGUF file (metadata and tensor infos), with an error naming the file.
/// The header is checked first ([`check_header`]), so that candle's reader never allocates what
/// a corrupt header claims nor divides by a zero alignment.
pub fn read_content(path: &Path, file: &mut std::fs::File) -> Result<Content> {
    check_header(path, file)?;
    file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    Content::read(file)
        .map_err(|e| Error::Config { path: path.to_path_buf(), reason: format!("not a readable GGUF file: {e}") })
}

/// The most dimensions of a GGUF tensor (llama.cpp's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// The most nested arrays in a metadata value.
const MAX_DEPTH: usize = 3;

/// Walks a GGUF header (llama.cpp's `gguf.cpp` layout, versions 1 to 3) and checks every size it
/// declares against the file's length before anything is allocated: string lengths, array and
/// entry counts, `general.alignment` (a non-zero power of two), each tensor's dimensions (at most
/// 4, a product that does not overflow, whole blocks of its type), its offset (aligned) and its
/// data (inside the file). The error names the file, the key or tensor, and what was expected.
pub fn check_header(path: &Path, file: &mut std::fs::File) -> Result<()> {
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    let mut h = Header { r: BufReader::new(file), pos: 0, len, path, v1: false };
    if &h.bytes::<4>("the magic")? != b"GGUF" {
        return Err(h.bad("it does not start with `GGUF`".into()));
    }
    let version = h.u32("the version")?;
    if !(1..=3).contains(&version) {
        return Err(h.bad(format!("version {version}; expected 1, 2 or 3")));
    }
    h.v1 = version == 1;
    let tensors = h.count("the tensor count")?;
    let entries = h.count("the metadata count")?;
    // Each entry takes at least a key length and a type (12 bytes), each tensor info at least a
    // name length, a dimension count, a type and an offset (24 bytes).
    if entries.saturating_mul(12).saturating_add(tensors.saturating_mul(24)) > h.remaining() {
        return Err(h.bad(format!(
            "the header declares {tensors} tensors and {entries} metadata entries, more than its {len} bytes hold"
        )));
    }
    let mut alignment = 32;
    for _ in 0..entries {
        let key = h.string("a metadata key")?;
        let ty = h.u32(&key)?;
        if let Some(v) = h.value(ty, &key, 0)? {
            if key == "general.alignment" {
                if v == 0 || !v.is_power_of_two() {
                    return Err(h.bad(format!("general.alignment is {v}; expected a power of two (32 by default)")));
                }
                alignment = v;
            }
        }
    }
    let mut extents = Vec::new();
    for _ in 0..tensors {
        let name = h.string("a tensor name")?;
        let n_dims = h.u32(&name)?;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(h.bad(format!("tensor {name} has {n_dims} dimensions; expected 1 to {MAX_DIMS}")));
        }
        let mut elems = 1u64;
        for _ in 0..n_dims {
            let d = h.count(&name)?;
            if d == 0 {
                // candle's reader makes a slice of a dangling pointer for an empty tensor.
                return Err(h.bad(format!("tensor {name} has a dimension of 0; expected at least 1")));
            }
            elems = elems
                .checked_mul(d)
                .ok_or_else(|| h.bad(format!("tensor {name}: its dimensions' product overflows")))?;
        }
        let ty = h.u32(&name)?;
        let ggml = ggml_type(ty).ok_or_else(|| h.bad(format!("tensor {name} has the unknown type {ty}")))?;
        let block = ggml.block_size() as u64;
        if elems % block != 0 {
            return Err(h.bad(format!("tensor {name}: {elems} values are not whole blocks of {block} ({ggml:?})")));
        }
        let bytes = (elems / block)
            .checked_mul(ggml.type_size() as u64)
            .ok_or_else(|| h.bad(format!("tensor {name}: its size overflows")))?;
        let offset = h.u64(&name)?;
        if offset % alignment != 0 {
            return Err(
                h.bad(format!("tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}"))
            );
        }
        extents.push((name, offset, bytes));
    }
    let data = h.pos.div_ceil(alignment) * alignment;
    for (name, offset, bytes) in extents {
        if data.checked_add(offset).and_then(|o| o.checked_add(bytes)).is_none_or(|end| end > len) {
            return Err(h.bad(format!(
                "tensor {name}: {bytes} bytes at offset {offset} end past the end of the file ({len} bytes; data from byte {data})"
            )));
        }
    }
    Ok(())
}

/// A GGUF tensor type by its number (ggml's `ggml_type`), for the types candle reads.
fn ggml_type(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A reader over a GGUF header that knows how many bytes the file has left.
struct Header<'a> {
    r: BufReader<&'a mut std::fs::File>,
    pos: u64,
    len: u64,
    path: &'a Path,
    v1: bool,
}

impl Header<'_> {
    fn bad(&self, reason: String) -> Error {
        Error::Config { path: self.path.to_path_buf(), reason: format!("not a readable GGUF file: {reason}") }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Checks that `n` more bytes of `what` fit in the file.
    fn need(&self, n: u64, what: &str) -> Result<()> {
        if n > self.remaining() {
            return Err(self.bad(format!(
                "{what} ({n} bytes from byte {}) ends past the end of the file ({} bytes)",
                self.pos, self.len
            )));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| Error::io(self.path, e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A count or length: 32 bits in version 1, 64 after.
    fn count(&mut self, what: &str) -> Result<u64> {
        if self.v1 {
            Ok(self.u32(what)?.into())
        } else {
            self.u64(what)
        }
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.need(n, what)?;
        // `need` bounds `n` by the file's length, which fits an i64.
        self.r.seek_relative(n as i64).map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what)?;
        self.need(n, what)?;
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(shown(&String::from_utf8_lossy(&b)))
    }

    /// Skips a metadata value of type `ty`; returns it when it is an unsigned or non-negative
    /// integer.
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Option<u64>> {
        let size = |ty: u32| match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match ty {
            0 => Ok(Some(self.bytes::<1>(key)?[0].into())),
            2 => Ok(Some(u16::from_le_bytes(self.bytes(key)?).into())),
            4 => Ok(Some(self.u32(key)?.into())),
            10 => Ok(Some(self.u64(key)?)),
            1 => Ok(u64::try_from(i8::from_le_bytes(self.bytes(key)?)).ok()),
            3 => Ok(u64::try_from(i16::from_le_bytes(self.bytes(key)?)).ok()),
            5 => Ok(u64::try_from(i32::from_le_bytes(self.bytes(key)?)).ok()),
            11 => Ok(u64::try_from(i64::from_le_bytes(self.bytes(key)?)).ok()),
            6 | 7 | 12 => self.skip(size(ty).unwrap_or(8), key).map(|_| None),
            8 => {
                let n = self.count(key)?;
                self.skip(n, key).map(|_| None)
            }
            9 => {
                let elem = self.u32(key)?;
                let n = self.count(key)?;
                if let Some(size) = size(elem) {
                    let bytes = n
                        .checked_mul(size)
                        .ok_or_else(|| self.bad(format!("metadata {key}: an array of {n} values overflows")))?;
                    return self.skip(bytes, key).map(|_| None);
                }
                if depth >= MAX_DEPTH || !matches!(elem, 8 | 9) {
                    return Err(self.bad(format!("metadata {key}: an array of type {elem} (nested {depth} deep)")));
                }
                // Each string or array element takes at least 8 bytes.
                self.need(n.saturating_mul(8), key)?;
                for _ in 0..n {
                    self.value(elem, key, depth + 1)?;
                }
                Ok(None)
            }
            _ => Err(self.bad(format!("metadata {key} has the unknown type {ty}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file: `entries` (key, type, value bytes), then tensor infos (name, dims, type,
    /// offset), then `data` bytes of tensor data at the default alignment.
    fn gguf(entries: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
        let string = |s: &str| [(s.len() as u64).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat();
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((entries.len() as u64).to_le_bytes());
        for (key, ty, value) in entries {
            b.extend(string(key));
            b.extend(ty.to_le_bytes());
            b.extend(value);
        }
        for (name, dims, ty, offset) in tensors {
            b.extend(string(name));
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32 + data, 0);
        b
    }

    fn check(bytes: &[u8]) -> std::result::Result<Content, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        read_content(&path, &mut file).map_err(|e| {
            let msg = e.to_string();
            assert!(msg.contains("model.gguf"), "the error names the file: {msg}");
            msg
        })
    }

    /// Headers that would make candle's reader panic (a zero alignment), allocate what they
    /// claim, or read a tensor's bytes from the wrong place are refused with the key or tensor
    /// named; a well-formed file still reads.
    #[test]
    fn corrupt_headers_are_refused_before_anything_is_allocated() {
        let name = |v: &str| [(v.len() as u64).to_le_bytes().to_vec(), v.as_bytes().to_vec()].concat();
        let ok = gguf(&[("general.name", 8, name("tiny"))], &[("w", &[32, 2], 8, 0)], 68);
        let content = check(&ok).expect("a well-formed file reads");
        assert_eq!(content.tensor_infos["w"].shape.dims(), &[2, 32]);

        let cases: [(Vec<u8>, &str); 11] = [
            (gguf(&[("general.alignment", 4, 0u32.to_le_bytes().to_vec())], &[], 0), "general.alignment is 0"),
            (gguf(&[("general.alignment", 4, 48u32.to_le_bytes().to_vec())], &[], 0), "expected a power of two"),
            (
                gguf(&[("general.name", 8, (1u64 << 40).to_le_bytes().to_vec())], &[], 0),
                "general.name (1099511627776 bytes",
            ),
            (
                gguf(
                    &[("tokens", 9, [8u32.to_le_bytes().to_vec(), (1u64 << 32).to_le_bytes().to_vec()].concat())],
                    &[],
                    0,
                ),
                "tokens (34359738368 bytes",
            ),
            (
                gguf(
                    &[("scores", 9, [6u32.to_le_bytes().to_vec(), (1u64 << 62).to_le_bytes().to_vec()].concat())],
                    &[],
                    0,
                ),
                "scores: an array of 4611686018427387904 values overflows",
            ),
            (gguf(&[], &[("w", &[1 << 40, 1 << 40], 0, 0)], 0), "tensor w: its dimensions' product overflows"),
            (gguf(&[], &[("w", &[32, 2], 8, 8)], 68), "offset 8 is not a multiple of the alignment 32"),
            (gguf(&[], &[("w", &[32, 2], 8, 0)], 67), "tensor w: 68 bytes at offset 0 end past the end of the file"),
            (gguf(&[], &[("w", &[30], 8, 0)], 68), "30 values are not whole blocks of 32"),
            (gguf(&[], &[("w", &[1, 1, 1, 1, 1], 0, 0)], 4), "tensor w has 5 dimensions; expected 1 to 4"),
            (gguf(&[], &[("w", &[32, 0], 0, 0)], 0), "tensor w has a dimension of 0; expected at least 1"),
        ];
        // A name of binary garbage is shown escaped and cut.
        let long = format!("\u{1}{}", "x".repeat(999));
        let e = check(&gguf(&[], &[(long.as_str(), &[0], 0, 0)], 0)).unwrap_err();
        assert!(
            e.contains(r#"tensor "\u{1}xxx"#) && e.contains("... (1000 bytes) has a dimension of 0") && e.len() < 200,
            "{e}"
        );
        for (bytes, says) in cases {
            let e = check(&bytes).unwrap_err();
            assert!(e.contains(says), "expected `{says}` in: {e}");
        }
        // 2^32 metadata entries in a small file.
        let mut many = gguf(&[], &[], 0);
        many[16..24].copy_from_slice(&(1u64 << 32).to_le_bytes());
        assert!(check(&many).unwrap_err().contains("4294967296 metadata entries"));
        assert!(check(b"GGUF\x07\0\0\0").unwrap_err().contains("version 7"));
        assert!(check(b"GGML").unwrap_err().contains("does not start with `GGUF`"));
    }
}
