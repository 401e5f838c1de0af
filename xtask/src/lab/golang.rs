//! The lab's own Go programs (xtask/go), built from source with Debian's golang-1.19 into a
//! cache directory keyed by a hash of their sources: the first test of a machine builds them
//! (about 10 s), the others reuse the binaries.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::cmd::run_command;

/// A program under xtask/go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoProgram {
    /// An HTTPS server (`-listen A -cert C -key K`) and one-shot client (`-get URL -ca CA
    /// [-traceparent T]`) on crypto/tls, with symbols.
    Https,
    /// A TCP echo server (`-listen A`) without crypto/tls.
    PlainTcp,
}

impl GoProgram {
    fn package(self) -> &'static str {
        match self {
            GoProgram::Https => "https",
            GoProgram::PlainTcp => "plaintcp",
        }
    }
}

/// Debian's golang-1.19 installs here without putting `go` on PATH (scripts/setup.sh).
const DEBIAN_GO: &str = "/usr/lib/go-1.19/bin/go";

fn go_command() -> &'static str {
    if Path::new(DEBIAN_GO).exists() {
        DEBIAN_GO
    } else {
        "go"
    }
}

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("go")
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("hoptrace").join("go")
}

/// The path of `program`'s binary, building it first if its sources changed. Safe to call
/// from parallel tests and processes: each build goes to a private file renamed into place.
pub fn go_binary(program: GoProgram) -> Result<PathBuf> {
    let sources = source_dir();
    let mut hasher = DefaultHasher::new();
    for file in ["go.mod", &format!("{}/main.go", program.package())] {
        let path = sources.join(file);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        (file, text).hash(&mut hasher);
    }
    let cache = cache_dir();
    // One directory per source hash, the binary named as its package: the process name
    // (comm) is then the package's, as spans report it.
    let dir = cache.join(format!("{}-{:016x}", program.package(), hasher.finish()));
    let binary = dir.join(program.package());
    if binary.exists() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = tempfile::Builder::new()
        .prefix(&format!("{}.partial-", program.package()))
        .tempfile_in(&dir)
        .context("creating the Go build's output file")?
        .into_temp_path();
    run_command(
        Command::new(go_command())
            .current_dir(&sources)
            .args(["build", "-trimpath", "-o"])
            .arg(&partial)
            .arg(format!("./{}", program.package()))
            // Static and self-contained: no cgo, no module downloads, no ~/go.
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-mod=mod")
            .env("GOPROXY", "off")
            .env("GOCACHE", cache.join("build-cache"))
            .env("GOPATH", cache.join("gopath")),
    )
    .with_context(|| {
        format!(
            "building the lab's Go program {} (is golang-1.19 installed? scripts/setup.sh)",
            program.package()
        )
    })?;
    partial
        .persist(&binary)
        .with_context(|| format!("moving the Go build to {}", binary.display()))?;
    Ok(binary)
}
