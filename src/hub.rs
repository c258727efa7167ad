//! Models named by Hugging Face Hub id (`org/name`, `org/name@revision`), found in the local HF
//! cache as `huggingface_hub` lays it out (so a model that transformers downloaded is found), and
//! downloaded into it with the `hf-hub` crate when the `hub` feature is on and the network is
//! there.
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
//!   models--org--name/refs/<branch or tag>      the commit hash it points to
//!   models--org--name/snapshots/<commit>/<file>  the files of that commit
//! ```
//! A revision is a branch, a tag (through `refs/`) or a commit hash (a snapshot of its own);
//! `main` when none is given. `HF_HUB_OFFLINE=1` (or `true`, `yes`, `on`) never touches the
//! network: what the cache lacks is then an error that lists the missing files.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{Error, Result};

/// A Hub model id with its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// A branch, a tag or a commit hash.
    pub revision: String,
}

impl FromStr for HubId {
    type Err = Error;

    /// `org/name` or `org/name@revision`: two non-empty parts of letters, digits, `-`, `_`
    /// and `.` (not starting with `.`), as the Hub allows.
    fn from_str(s: &str) -> Result<Self> {
        let (repo, revision) = s.split_once('@').unwrap_or((s, "main"));
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let valid = matches!(repo.split_once('/'), Some((org, name)) if part_ok(org) && part_ok(name))
            && !revision.is_empty()
            && !revision.starts_with('/')
            && !revision.contains("..")
            && revision.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !valid {
            return Err(Error::Hub {
                repo: s.to_string(),
                reason: "not a Hub model id; expected org/name or org/name@revision".into(),
            });
        }
        Ok(Self { repo: repo.to_string(), revision: revision.to_string() })
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// Whether `model` (a `--model` argument) names a Hub model rather than a local path: it is not
/// an existing path and parses as a [`HubId`].
pub fn is_hub_id(model: &str) -> bool {
    !Path::new(model).exists() && model.parse::<HubId>().is_ok()
}

/// The cache directory: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`
/// (`huggingface_hub`'s order).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` asks for no network access.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The files of a model repository that loading one needs: `config.json`, the weights
/// (`model.safetensors`, or the shards `model.safetensors.index.json` lists) and
/// `tokenizer.json`; `tokenizer_config.json` and `generation_config.json` when the repository has
/// them. Returns the snapshot directory that holds them, which loads as an HF model directory.
pub fn resolve_model(id: &HubId) -> Result<PathBuf> {
    resolve_model_in(&cache_dir(), id, offline())
}

/// [`resolve_model`] with the cache directory and the offline switch given. A model whose files
/// are all in the cache is used without touching the network; otherwise (unless `offline`) the
/// missing files are downloaded.
pub fn resolve_model_in(cache: &Path, id: &HubId, offline: bool) -> Result<PathBuf> {
    match resolve_files(cache, id, true) {
        Err(_) if !offline => resolve_files(cache, id, false),
        found => found,
    }
}

/// The files of [`resolve_model`], downloading what the cache lacks unless `offline`.
fn resolve_files(cache: &Path, id: &HubId, offline: bool) -> Result<PathBuf> {
    let mut repo = CachedRepo::new(cache, id, offline);
    repo.require("config.json")?;
    if repo.optional("model.safetensors.index.json")? {
        let index = repo.snapshot()?.join("model.safetensors.index.json");
        for shard in crate::format::safetensors_index_files(&index)? {
            repo.require(&shard)?;
        }
    } else {
        repo.require("model.safetensors")?;
    }
    repo.require("tokenizer.json")?;
    repo.optional("tokenizer_config.json")?;
    repo.optional("generation_config.json")?;
    repo.finish()
}

/// One repository of the cache, its files fetched or found one by one.
struct CachedRepo<'a> {
    cache: &'a Path,
    id: &'a HubId,
    offline: bool,
    /// The commit the revision resolved to, once known.
    commit: Option<String>,
    /// Required files neither in the cache nor downloadable.
    missing: Vec<String>,
}

impl<'a> CachedRepo<'a> {
    fn new(cache: &'a Path, id: &'a HubId, offline: bool) -> Self {
        let mut repo = Self { cache, id, offline, commit: None, missing: Vec::new() };
        repo.commit = repo.cached_commit();
        repo
    }

    /// `models--org--name`.
    fn dir(&self) -> PathBuf {
        self.cache.join(format!("models--{}", self.id.repo.replace('/', "--")))
    }

    /// The commit of the revision in the cache: `refs/<revision>`'s content, or the revision
    /// itself when it is a commit with a snapshot.
    fn cached_commit(&self) -> Option<String> {
        let dir = self.dir();
        if let Ok(hash) = std::fs::read_to_string(dir.join("refs").join(&self.id.revision)) {
            return Some(hash.trim().to_string());
        }
        dir.join("snapshots").join(&self.id.revision).is_dir().then(|| self.id.revision.clone())
    }

    fn snapshot(&self) -> Result<PathBuf> {
        match &self.commit {
            Some(c) => Ok(self.dir().join("snapshots").join(c)),
            None => Err(self.not_cached(&["config.json".to_string()])),
        }
    }

    /// Finds `file` in the snapshot, or downloads it; `Ok(false)` when the repository does not
    /// have it (or, offline, the cache does not).
    fn fetch(&mut self, file: &str) -> Result<bool> {
        if let Some(c) = &self.commit {
            if self.dir().join("snapshots").join(c).join(file).is_file() {
                return Ok(true);
            }
        }
        if self.offline {
            return Ok(false);
        }
        self.download(file)
    }

    fn require(&mut self, file: &str) -> Result<()> {
        if !self.fetch(file)? {
            self.missing.push(file.to_string());
        }
        Ok(())
    }

    fn optional(&mut self, file: &str) -> Result<bool> {
        self.fetch(file)
    }

    fn finish(self) -> Result<PathBuf> {
        if !self.missing.is_empty() {
            return Err(self.not_cached(&self.missing));
        }
        self.snapshot()
    }

    /// The error for required files that could not be had.
    fn not_cached(&self, files: &[String]) -> Error {
        let how = if self.offline {
            "HF_HUB_OFFLINE is set, so nothing is downloaded; unset it to download them, or copy the model \
             there with `huggingface-cli download`"
        } else if cfg!(feature = "hub") {
            "the Hub does not have them at this revision"
        } else {
            "this build has no `hub` feature to download them (cargo build --features hub), or download them \
             with `huggingface-cli download`"
        };
        Error::Hub {
            repo: self.id.to_string(),
            reason: format!(
                "{} not in the cache {} ({}); {how}",
                files.join(", "),
                self.dir().display(),
                match &self.commit {
                    Some(c) => format!("revision {} is commit {c}", self.id.revision),
                    None => format!("no snapshot of revision {}", self.id.revision),
                }
            ),
        }
    }

    /// Downloads `file` into the cache with `hf-hub` (which writes `huggingface_hub`'s layout),
    /// at the commit already resolved when there is one (so that every file comes from the same
    /// commit); `Ok(false)` when the repository has no such file. The token is `HF_TOKEN`, else
    /// the file `huggingface-cli login` writes; the endpoint `HF_ENDPOINT` when set.
    #[cfg(feature = "hub")]
    fn download(&mut self, file: &str) -> Result<bool> {
        use hf_hub::api::sync::{ApiBuilder, ApiError};
        let fail = |reason: String| Error::Hub { repo: self.id.to_string(), reason };
        let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(self.cache.to_path_buf()))
            .with_progress(true)
            .with_token(token());
        if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
            builder = builder.with_endpoint(endpoint);
        }
        let api = builder.build().map_err(|e| fail(format!("cannot reach the Hub: {e}")))?;
        let revision = self.commit.clone().unwrap_or_else(|| self.id.revision.clone());
        let repo = hf_hub::Repo::with_revision(self.id.repo.clone(), hf_hub::RepoType::Model, revision);
        match api.repo(repo).get(file) {
            Ok(_) => {
                if self.commit.is_none() {
                    self.commit = self.cached_commit();
                }
                Ok(true)
            }
            Err(ApiError::RequestError(e)) => match *e {
                ureq::Error::StatusCode(404) => Ok(false),
                ureq::Error::StatusCode(code @ (401 | 403)) => Err(fail(format!(
                    "downloading {file}: HTTP {code}; the repository is gated or private: accept its terms on the \
                     Hub and set HF_TOKEN (or run `huggingface-cli login`)"
                ))),
                e => Err(fail(format!("downloading {file}: {e}"))),
            },
            Err(e) => Err(fail(format!("downloading {file}: {e}"))),
        }
    }

    #[cfg(not(feature = "hub"))]
    fn download(&mut self, _file: &str) -> Result<bool> {
        Ok(false)
    }
}

/// The Hub token: `HF_TOKEN`, else the file `HF_TOKEN_PATH` names, else `HF_HOME/token`
/// (`~/.cache/huggingface/token`), as `huggingface_hub` reads it.
#[cfg(feature = "hub")]
fn token() -> Option<String> {
    if let Some(t) = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        return Some(t.trim().to_string());
    }
    let path = std::env::var_os("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".cache").join("huggingface")
        });
        home.join("token")
    });
    std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse() {
        let id: HubId = "HuggingFaceTB/SmolLM2-135M-Instruct@v1.0".parse().unwrap();
        assert_eq!((id.repo.as_str(), id.revision.as_str()), ("HuggingFaceTB/SmolLM2-135M-Instruct", "v1.0"));
        assert_eq!("org/name".parse::<HubId>().unwrap().revision, "main");
        for bad in ["name", "a/b/c", "/name", "org/", "org/name@", "../x", "org/na me", "org/name@/etc/passwd"] {
            assert!(bad.parse::<HubId>().is_err(), "{bad}");
        }
    }
}
