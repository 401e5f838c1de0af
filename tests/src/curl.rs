//! curl from the lab's agent namespace.

use xtask::lab::{Host, Lab, PERSONA_IP, PERSONA_TLS_NAME};

/// curl to `https://persona.lab:<port><path>` (SNI and all), trusting the lab's persona CA,
/// with `extra` options.
pub fn curl_persona_https(lab: &Lab, port: u16, path: &str, extra: &[&str]) {
    let resolve = format!("{PERSONA_TLS_NAME}:{port}:{PERSONA_IP}");
    let url = format!("https://{PERSONA_TLS_NAME}:{port}{path}");
    let ca = lab.persona_ca().to_str().unwrap().to_owned();
    let mut argv = vec![
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        "5",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
    ];
    argv.extend_from_slice(extra);
    argv.push(&url);
    lab.run(Host::Agent, &argv).expect("curl");
}
