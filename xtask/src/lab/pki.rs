//! Certificates for the lab's TLS servers, made with the `openssl` command line: a CA per
//! authority (the persona's own, and later a firewall's interception CA) and leaf certificates
//! it signs. ECDSA P-256 keys: generating them takes milliseconds, so every lab gets its own.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::cmd::run_command;

/// A certificate and its private key, PEM files.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a self-signed CA `name` under `dir` (`<name>-ca.pem`, `<name>-ca.key`).
pub fn create_ca(dir: &Path, name: &str) -> Result<CertKey> {
    let ca = CertKey {
        cert: dir.join(format!("{name}-ca.pem")),
        key: dir.join(format!("{name}-ca.key")),
    };
    run_command(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
            ])
            .arg("-subj")
            .arg(format!("/CN=hoptrace lab {name} CA"))
            .arg("-keyout")
            .arg(&ca.key)
            .arg("-out")
            .arg(&ca.cert),
    )
    .with_context(|| format!("creating the {name} CA"))?;
    Ok(ca)
}

/// Creates a leaf certificate for `subject_alt_names` (e.g. `DNS:persona.lab,IP:10.10.2.2`)
/// signed by `ca`, under `dir` as `<name>.pem` / `<name>.key`.
pub fn create_leaf(
    dir: &Path,
    name: &str,
    subject_alt_names: &str,
    ca: &CertKey,
) -> Result<CertKey> {
    let leaf = CertKey {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    let csr = dir.join(format!("{name}.csr"));
    run_command(
        Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .arg("-subj")
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(&leaf.key)
            .arg("-out")
            .arg(&csr),
    )
    .with_context(|| format!("creating the key and request of {name}"))?;
    // Extensions through a file: `openssl x509 -req` has no -addext in OpenSSL 3.0.
    let extensions = dir.join(format!("{name}.ext"));
    std::fs::write(
        &extensions,
        format!("subjectAltName={subject_alt_names}\nextendedKeyUsage=serverAuth\n"),
    )
    .context("writing the extensions file")?;
    run_command(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&ca.cert)
            .arg("-CAkey")
            .arg(&ca.key)
            .arg("-extfile")
            .arg(&extensions)
            .arg("-out")
            .arg(&leaf.cert),
    )
    .with_context(|| format!("signing {name} with {}", ca.cert.display()))?;
    Ok(leaf)
}
