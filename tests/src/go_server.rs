//! The lab's self-built Go HTTPS server (Go crypto/tls with symbols), for the tests that need
//! a Go TLS peer.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use xtask::lab::{
    Background, Host, Lab, PERSONA_IP,
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

/// The self-built Go HTTPS server on `port` in the persona, with a certificate of the lab's
/// persona CA; its log (a handshake error for each readiness probe) stays in the lab's dir.
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
        .stderr(std::fs::File::create(lab.temp_dir().join("go-server.log")).unwrap());
    let mut server = Background::spawn(&mut cmd).unwrap();
    wait_listening(lab, &mut server, SocketAddr::new(PERSONA_IP.into(), port));
    server
}
