//! Background processes (with a kill-on-drop guard) and the lab's HTTP servers in persona.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{cmd::describe, netns::Netns, pki::CertKey};

/// Size of the body served at `/big` by both servers.
pub const BIG_BODY_LEN: usize = 64 * 1024;
/// Body served at `/` by nginx.
pub const NGINX_SMALL_BODY: &str = "hello from persona (nginx)\n";
/// Body served at `/` by the Python server.
pub const PYTHON_SMALL_BODY: &str = "hello from persona (python)\n";

/// How long a [`Background`] process gets between SIGTERM and SIGKILL: nginx needs a moment
/// to stop its workers, which it does only on a graceful signal.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// A child process that is terminated (SIGTERM, then SIGKILL after 2 s) and reaped when
/// dropped, so that a panicking test does not leave it running.
#[derive(Debug)]
pub struct Background {
    child: Child,
    label: String,
}

impl Background {
    /// Spawns `cmd` (typically from [`super::Lab::exec`]). Stdin is closed; stdout and stderr
    /// are whatever `cmd` says (inherited unless set).
    pub fn spawn(cmd: &mut Command) -> Result<Background> {
        let label = describe(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start `{label}`"))?;
        Ok(Background { child, label })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The underlying child, e.g. to take its stdout pipe.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// `Some(status)` once the process has exited (and is reaped), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for `{}`", self.label))
    }

    /// Sends SIGTERM, waits up to 2 s, then SIGKILLs; returns the exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: plain system call; the pid is our unreaped child, so it cannot be reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(5));
        }
        log::warn!("lab: `{}` ignored SIGTERM, killing it", self.label);
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            log::warn!("lab: cannot stop `{}`: {e:#}", self.label);
        }
    }
}

/// A started server: its process and where its output goes.
pub struct Server {
    pub process: Background,
    pub log: PathBuf,
    pub addr: SocketAddr,
}

/// Writes nginx's config and bodies under `dir` and starts `nginx` in `persona` with
/// `workers` worker processes (0 = `auto`), serving the same content over HTTP on `addr` and
/// over HTTPS (TLS 1.2 and 1.3, certificate `tls`) on `tls_port`.
///
/// Why each setting: `daemon off` keeps the master our child (so we can stop it); pid, lock and
/// temp paths in `dir` keep parallel labs apart and away from the system's nginx; `-e stderr`
/// stops nginx from touching the compiled-in error log before it reads the config; `user root`
/// lets workers read the 0700 temp dir; access log off and a large keep-alive request limit
/// keep it fast under load.
pub fn start_nginx(
    persona: &Netns,
    dir: &Path,
    addr: SocketAddr,
    tls_port: u16,
    tls: &CertKey,
    workers: u32,
) -> Result<Server> {
    let www = dir.join("www");
    fs::create_dir_all(&www).with_context(|| format!("create {}", www.display()))?;
    fs::write(www.join("index.html"), NGINX_SMALL_BODY).context("write nginx body")?;
    fs::write(www.join("big"), big_body()).context("write nginx big body")?;
    let d = dir.display();
    let workers = if workers == 0 {
        "auto".to_owned()
    } else {
        workers.to_string()
    };
    let conf = format!(
        r#"daemon off;
master_process on;
user root;
worker_processes {workers};
pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/plain;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {port} default_server backlog=4096;
        listen {tls_port} ssl default_server backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {www};
        location = / {{ try_files /index.html =404; }}
        location = /big {{ try_files /big =404; }}
    }}
}}
"#,
        port = addr.port(),
        www = www.display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).context("write nginx.conf")?;
    let log = dir.join("nginx.log");
    let mut cmd = persona.command("nginx");
    cmd.arg("-e")
        .arg("stderr")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path);
    let process = spawn_logged(&mut cmd, &log)?;
    Ok(Server { process, log, addr })
}

/// A tiny threaded HTTP/1.1 keep-alive server: `GET /` (small), `GET /big` (64 KiB),
/// `POST` anything (reads the body, answers with its length). Better than `python3 -m
/// http.server`, which answers HTTP/1.0 and closes each connection, has a listen backlog of 5
/// and leaves Nagle on (40 ms stalls with delayed ACKs, since headers and body are separate
/// writes).
const PYTHON_SERVER: &str = r#"
import http.server, sys

SMALL = sys.argv[3].encode()
BIG = b"x" * int(sys.argv[4])

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.reply(200, SMALL)
        elif path == "/big":
            self.reply(200, BIG)
        else:
            self.reply(404, b"not found\n")

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        self.reply(200, b"%d\n" % n)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096

Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"#;

/// Writes the Python server script under `dir` and starts it in `persona`.
pub fn start_python(persona: &Netns, dir: &Path, addr: SocketAddr) -> Result<Server> {
    let script = dir.join("server.py");
    fs::write(&script, PYTHON_SERVER).context("write server.py")?;
    // Debian's interpreter directly: a pyenv shim first in PATH costs a shell and ~100 ms.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let log = dir.join("python.log");
    let mut cmd = persona.command(python);
    cmd.arg("-u")
        .arg(&script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(PYTHON_SMALL_BODY)
        .arg(BIG_BODY_LEN.to_string());
    let process = spawn_logged(&mut cmd, &log)?;
    Ok(Server { process, log, addr })
}

fn big_body() -> Vec<u8> {
    vec![b'x'; BIG_BODY_LEN]
}

pub(super) fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Background> {
    let out = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    Background::spawn(cmd.stdout(out).stderr(err))
}

/// Polls a TCP connect to the server's address from inside `ns` until it succeeds, the server
/// exits, or `timeout` passes; errors carry the server's log.
pub fn wait_listening(ns: &Netns, server: &mut Server, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let addr = server.addr;
    loop {
        let attempt =
            ns.run_in(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)))?;
        if attempt.is_ok() {
            return Ok(());
        }
        if let Some(status) = server.process.try_wait()? {
            bail!(
                "`{}` exited ({status}) before listening on {addr}: {}",
                server.process.label(),
                log_tail(&server.log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "`{}` not listening on {addr} in {} after {timeout:?} (last error: {}); log: {}",
                server.process.label(),
                ns.name(),
                attempt.unwrap_err(),
                log_tail(&server.log)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn log_tail(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            if tail.is_empty() {
                "(empty)".to_owned()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
