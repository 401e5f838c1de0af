//! A TLS-inspecting middlebox in fw, as a next-generation firewall does it: haproxy terminates
//! the agent's TLS with a certificate forged for the persona's name and signed by the
//! firewall's own interception CA (which the agent must trust), and opens a second TLS
//! connection to the original destination, verifying the persona's real certificate.
//!
//! ```text
//!  agent --TLS (forged cert)--> fw haproxy :8443 --TLS (persona's cert)--> persona :443
//!          nat REDIRECT of agent -> 10.10.2.2:443 on fw's agent-side interface
//! ```
//!
//! Two TCP and two TLS connections: a forward delay in fw lands on the agent <-> fw leg, a return
//! delay on the fw <-> persona leg (NFQUEUE runs in mangle PREROUTING, before the nat REDIRECT).

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use super::{
    FW_AGENT_IP, Host, Lab, NGINX_TLS_PORT, PERSONA_IP, PERSONA_TLS_NAME, iptables, pki,
    servers::{self, Background, Server},
};

/// haproxy's port in fw: where the nat rule redirects the agent's TLS connections.
pub const INTERCEPTION_PORT: u16 = 8443;

/// How haproxy's own TLS connections to the persona are negotiated.
#[derive(Clone, Copy, Debug, Default)]
pub struct PersonaLeg<'a> {
    /// haproxy's `ssl-max-ver` (e.g. `TLSv1.2`); None: up to TLS 1.3.
    pub max_version: Option<&'a str>,
    /// A full handshake on every connection (haproxy's `no-ssl-reuse`); by default haproxy
    /// resumes its last TLS session with the server.
    pub full_handshakes: bool,
}

/// A running interception; dropping it removes the redirect and stops haproxy.
pub struct TlsInterception<'lab> {
    lab: &'lab Lab,
    /// The nat rule's arguments after the `-A`/`-D` action.
    rule: Vec<String>,
    haproxy: Option<Background>,
    ca: pki::CertKey,
    log: PathBuf,
}

impl Lab {
    /// Starts haproxy in fw and redirects the agent's connections to the persona's port 443
    /// to it. Returns once haproxy accepts connections. One at a time per lab (its port is
    /// fixed).
    pub fn start_tls_interception(&self) -> Result<TlsInterception<'_>> {
        self.start_tls_interception_with(PersonaLeg::default())
    }

    /// Like [`Lab::start_tls_interception`], with haproxy's own leg to the persona negotiated
    /// as `leg` says (the agent's leg is the agent's client's choice).
    pub fn start_tls_interception_with(&self, leg: PersonaLeg<'_>) -> Result<TlsInterception<'_>> {
        let dir = self.temp_dir().join("interception");
        fs::create_dir_all(&dir).context("creating the interception's directory")?;
        let ca = pki::create_ca(&dir, "interception")?;
        let forged = pki::create_leaf(
            &dir,
            "forged-persona",
            &format!("DNS:{PERSONA_TLS_NAME},IP:{PERSONA_IP}"),
            &ca,
        )?;
        // haproxy's `crt` takes the certificate and its key in one file.
        let bundle = dir.join("forged-persona.bundle.pem");
        let mut pem = fs::read(&forged.cert).context("reading the forged certificate")?;
        pem.extend(fs::read(&forged.key).context("reading the forged key")?);
        fs::write(&bundle, pem).context("writing the forged certificate bundle")?;
        let config = dir.join("haproxy.cfg");
        fs::write(&config, haproxy_config(&bundle, self.persona_ca(), leg))
            .context("writing haproxy.cfg")?;
        let log = dir.join("haproxy.log");
        let rule: Vec<String> = [
            "PREROUTING",
            "-i",
            &self.ifaces().fw_agent,
            "-p",
            "tcp",
            "-d",
            &PERSONA_IP.to_string(),
            "--dport",
            &NGINX_TLS_PORT.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            &INTERCEPTION_PORT.to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        // haproxy first, then the rule: no connection is redirected to a port nobody listens on.
        let process = servers::spawn_logged(
            self.exec(Host::Fw, &["haproxy", "-db", "-f"]).arg(&config),
            &log,
        )?;
        let mut interception = TlsInterception {
            lab: self,
            rule,
            haproxy: None,
            ca,
            log,
        };
        let mut server = Server {
            process,
            log: interception.log.clone(),
            addr: SocketAddr::new(IpAddr::V4(FW_AGENT_IP), INTERCEPTION_PORT),
        };
        servers::wait_listening(self.netns(Host::Fw), &mut server, Duration::from_secs(10))?;
        interception.haproxy = Some(server.process);
        interception.nat("-A")?;
        Ok(interception)
    }
}

impl TlsInterception<'_> {
    /// The PEM file of the interception CA: what the agent must trust to talk through fw.
    pub fn ca(&self) -> &Path {
        &self.ca.cert
    }

    /// haproxy's output (errors, and connection failures on either leg).
    pub fn log(&self) -> &Path {
        &self.log
    }

    fn nat(&self, action: &str) -> Result<()> {
        let mut argv = vec![iptables(), "-w", "-t", "nat", action];
        argv.extend(self.rule.iter().map(String::as_str));
        self.lab.run(Host::Fw, &argv)?;
        Ok(())
    }
}

impl Drop for TlsInterception<'_> {
    fn drop(&mut self) {
        if self.haproxy.is_some()
            && let Err(e) = self.nat("-D")
        {
            log::warn!("lab: removing the interception's nat rule: {e:#}");
        }
        // Background stops haproxy on drop.
        self.haproxy = None;
    }
}

/// HTTP mode, so that haproxy is a real L7 proxy (it re-writes header names in lower case and
/// keeps `traceparent`). `0.0.0.0:0` is the connection's original destination (before the nat
/// REDIRECT), verified against the persona's CA under the persona's name. `maxconn` stays low
/// enough that haproxy need not raise its descriptor limit (it refuses to start when it cannot).
fn haproxy_config(forged: &Path, persona_ca: &Path, leg: PersonaLeg<'_>) -> String {
    let mut options = leg
        .max_version
        .map_or(String::new(), |v| format!(" ssl-max-ver {v}"));
    if leg.full_handshakes {
        options += " no-ssl-reuse";
    }
    format!(
        "global\n\
         \x20   maxconn 4000\n\
         defaults\n\
         \x20   mode http\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 30s\n\
         \x20   timeout server 30s\n\
         frontend intercept\n\
         \x20   bind :{INTERCEPTION_PORT} ssl crt {forged}\n\
         \x20   default_backend original_destination\n\
         backend original_destination\n\
         \x20   server orig 0.0.0.0:0 ssl verify required ca-file {ca} sni str({PERSONA_TLS_NAME}){options}\n",
        forged = forged.display(),
        ca = persona_ca.display(),
    )
}
