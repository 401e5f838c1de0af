//! Go crypto/tls personas of the lab for the end-to-end tests: Debian's stripped caddy and the
//! lab's self-built Go HTTPS server, both serving HTTP/1.1 and HTTP/2 (ALPN) on persona.lab.

use std::{
    net::{SocketAddr, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use xtask::lab::{
    Background, Host, Lab, PERSONA_IP, PERSONA_TLS_NAME,
    golang::{GoProgram, go_binary},
};

/// Waits until `addr` in the persona accepts TCP connections.
pub fn wait_listening(lab: &Lab, server: &mut Background, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = lab
            .run_in(Host::Persona, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
            .unwrap();
        if up {
            return;
        }
        assert!(
            server.try_wait().unwrap().is_none(),
            "{} exited before listening",
            server.label()
        );
        assert!(
            Instant::now() < deadline,
            "{} not listening",
            server.label()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Debian's caddy serving HTTPS for persona.lab on `port`, state and logs in the lab's dir.
pub fn start_caddy(lab: &Lab, port: u16) -> Background {
    let dir = lab.temp_dir();
    let cert = lab.persona_certificate("caddy").unwrap();
    let config = dir.join("Caddyfile");
    std::fs::write(
        &config,
        format!(
            "{{\n  admin off\n  auto_https off\n}}\n\
             https://{PERSONA_TLS_NAME}:{port} {{\n  bind {PERSONA_IP}\n  \
             tls {} {}\n  respond \"caddy {{path}}\" 200\n}}\n",
            cert.cert.display(),
            cert.key.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("caddy.log")).unwrap();
    let mut cmd = lab.exec(
        Host::Persona,
        &["caddy", "run", "--adapter", "caddyfile", "--config"],
    );
    cmd.arg(&config)
        .env("XDG_DATA_HOME", dir.join("caddy-data"))
        .env("XDG_CONFIG_HOME", dir.join("caddy-config"))
        .stdout(Stdio::null())
        .stderr(log);
    let mut caddy = Background::spawn(&mut cmd).unwrap();
    wait_listening(lab, &mut caddy, SocketAddr::new(PERSONA_IP.into(), port));
    caddy
}

/// The self-built Go HTTPS server on `port`.
pub fn start_go_server(lab: &Lab, port: u16) -> Background {
    let binary = go_binary(GoProgram::Https).unwrap();
    let cert = lab.persona_certificate("go-server").unwrap();
    let listen = format!("{PERSONA_IP}:{port}");
    let mut cmd = lab.exec(Host::Persona, &[binary.as_os_str()]);
    cmd.arg("-listen")
        .arg(&listen)
        .arg("-cert")
        .arg(&cert.cert)
        .arg("-key")
        .arg(&cert.key)
        // Its log (a handshake error for each readiness probe) stays in the lab's dir.
        .stderr(std::fs::File::create(lab.temp_dir().join("go-server.log")).unwrap());
    let mut server = Background::spawn(&mut cmd).unwrap();
    wait_listening(lab, &mut server, SocketAddr::new(PERSONA_IP.into(), port));
    server
}
