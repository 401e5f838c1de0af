//! End-to-end: the agent on the path for kernels without `bpf_task_pt_regs` (before Linux
//! 5.15), forced on this kernel with HOPTRACE_TEST_NO_TASK_PT_REGS=1: the syscall programs
//! load without the Go TLS join (the verifier drops that branch), plain HTTP and OpenSSL HTTPS
//! still give their request spans, a Go TLS server gives none of its plaintext spans, and
//! `hoptrace check` and the agent's log say why. Needs root, the kernel and bpftool.

use std::{collections::HashSet, process::Command};

use hoptrace_tests::{
    agent::{Agent, hoptrace_bin},
    curl::curl_persona_https,
    personas::start_go_server,
    receiver::OtlpReceiver,
    request_spans::{request_span, wait_request_span},
};
use xtask::lab::{Host, Lab, LabConfig, NGINX_TLS_PORT};

const FORCE: (&str, &str) = ("HOPTRACE_TEST_NO_TASK_PT_REGS", "1");
const WHY: &str = "bpf_task_pt_regs treated as missing (HOPTRACE_TEST_NO_TASK_PT_REGS=1";
const GO_PORT: u16 = 8447;

/// `bpftool prog show` ids of the loaded programs named `name`.
fn program_ids(name: &str) -> HashSet<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool (Debian package bpftool; scripts/setup.sh installs it)");
    assert!(out.status.success(), "bpftool: {out:?}");
    let programs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    programs
        .iter()
        .filter(|p| p["name"] == name)
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// The helper calls in a loaded program's instructions, as the verifier left them.
fn calls_task_pt_regs(id: u64) -> bool {
    let out = Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &id.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {out:?}");
    String::from_utf8_lossy(&out.stdout).contains("bpf_task_pt_regs")
}

/// The header of a sampled traceparent in trace `trace_id`.
fn traceparent(trace_id: &str) -> String {
    format!("traceparent: 00-{trace_id}-00f067aa0ba902b7-01")
}

/// curl over HTTPS with HTTP/1.1 and a traceparent.
fn curl_https(lab: &Lab, port: u16, path: &str, trace_id: &str) {
    curl_persona_https(
        lab,
        port,
        path,
        &["--http1.1", "-H", &traceparent(trace_id)],
    );
}

#[test]
fn without_task_pt_regs_everything_but_go_tls_plaintext_works() {
    let lab = Lab::start(LabConfig {
        python: false,
        ..LabConfig::default()
    })
    .expect("lab");
    let _go = start_go_server(&lab, GO_PORT);
    let receiver = OtlpReceiver::start().expect("receiver");
    let before = program_ids("sys_exit_read");
    let mut agent = Agent::watching_lab_with(&lab, &receiver, &[FORCE]).expect("agent");
    let startup = agent.stderr();
    assert!(
        startup.contains("Go crypto/tls plaintext unavailable") && startup.contains(WHY),
        "{startup}"
    );
    assert!(!startup.contains("Go crypto/tls probed"), "{startup}");
    // The agent's syscall program as loaded: the verifier dropped the pruned branch, so an
    // older kernel's verifier never meets the helper it lacks.
    let ours: Vec<u64> = program_ids("sys_exit_read")
        .difference(&before)
        .copied()
        .collect();
    assert!(!ours.is_empty(), "the agent's sys_exit_read not found");
    for id in ours {
        assert!(
            !calls_task_pt_regs(id),
            "program {id} still calls bpf_task_pt_regs"
        );
    }

    // Plain HTTP: both ends.
    let plain = "4bf92f3577b34da6a3ce929d0e0e4711";
    let header = traceparent(plain);
    let url = lab.nginx_url("/plain");
    lab.run(
        Host::Agent,
        &["curl", "-sS", "-o", "/dev/null", "-H", &header, &url],
    )
    .expect("curl");
    wait_request_span(&receiver, &agent, "agent", plain);
    wait_request_span(&receiver, &agent, "persona", plain);

    // OpenSSL HTTPS (curl -> nginx): both ends through the OpenSSL uprobes.
    let openssl = "4bf92f3577b34da6a3ce929d0e0e4712";
    curl_https(&lab, NGINX_TLS_PORT, "/tls", openssl);
    for hop in ["agent", "persona"] {
        let span = wait_request_span(&receiver, &agent, hop, openssl);
        assert_eq!(
            span.attr_str("hoptrace.tls.plaintext_from"),
            Some("openssl"),
            "{span:#?}"
        );
    }

    // curl (OpenSSL) -> the Go server: curl's side is there, the Go server's is not.
    let go = "4bf92f3577b34da6a3ce929d0e0e4713";
    curl_https(&lab, GO_PORT, "/go", go);
    wait_request_span(&receiver, &agent, "agent", go);
    // Everything the agent has is exported on stop.
    agent.stop().unwrap();
    let spans = receiver.spans();
    assert!(
        request_span(&spans, "persona", go).is_none(),
        "a persona span from Go TLS plaintext without the join: {spans:#?}"
    );
    assert!(
        spans.iter().any(|s| s.name == "tls.handshake"
            && s.attr_i64("server.port") == Some(i64::from(GO_PORT))
            && s.attr_str("hoptrace.hop") == Some("persona")),
        "the Go server's handshake is still timed from the wire: {spans:#?}"
    );
    let log = agent.stderr();
    assert!(
        log.contains("Go crypto/tls: unavailable (") && log.contains(WHY),
        "{log}"
    );
}

#[test]
fn check_says_go_tls_is_unavailable_and_why() {
    let out = Command::new(hoptrace_bin().unwrap())
        .arg("check")
        .env(FORCE.0, FORCE.1)
        .output()
        .expect("hoptrace check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "only optional parts are missing: {stdout}"
    );
    let plan = stdout
        .lines()
        .find(|l| l.contains("TLS plaintext (Go crypto/tls uprobes)"))
        .unwrap_or_else(|| panic!("no Go TLS line in the plan: {stdout}"));
    assert!(
        plan.contains("[absent: Go crypto/tls plaintext unavailable:") && plan.contains(WHY),
        "{plan}"
    );
    let openssl = stdout
        .lines()
        .find(|l| l.contains("TLS plaintext (OpenSSL uprobes)"))
        .unwrap();
    assert!(openssl.contains("[ready]"), "{openssl}");
}
