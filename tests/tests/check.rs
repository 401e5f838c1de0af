//! `hoptrace check` on the real kernel: what works, the probe plan, and the exit status.

use std::process::{Command, Output};

use hoptrace_tests::agent::hoptrace_bin;

#[test]
fn check_reports_every_hook_kind_and_passes_here() {
    let out = Command::new(hoptrace_bin().unwrap())
        .arg("check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "tracepoint ",
        "tp_btf ",
        "uprobe ",
        "tc (tcx/clsact) ",
        "kprobe ",
        "fentry ",
        "kernel BTF ",
        "tracefs ",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(row)),
            "no {row:?} row:\n{text}"
        );
    }
    // This project's machines: tracepoints, uprobes and tc work, kprobes and fentry do not.
    let result = |row: &str| {
        text.lines()
            .find(|l| l.starts_with(row))
            .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_string())
    };
    assert_eq!(result("tracepoint ").as_deref(), Some("works"));
    assert!(
        text.contains("probe plan of `hoptrace agent`")
            && text.contains("[ready] sock:inet_sock_set_state")
            && text
                .lines()
                .any(|l| l.contains("TLS plaintext (OpenSSL uprobes)") && l.contains("[ready]")),
        "{text}"
    );
    assert!(text.contains("result: every required hook works"), "{text}");
}

/// Runs `hoptrace COMMAND` as nobody, with no capabilities.
fn unprivileged(command: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(hoptrace_bin().unwrap())
        .arg(command)
        .output()
        .unwrap()
}

#[test]
fn check_without_privileges_fails_and_says_why() {
    // Loading anything must fail, clearly.
    let out = unprivileged("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "check passed without privileges:\n{text}"
    );
    assert!(text.contains("MISSING") && text.contains("root"), "{text}");
    assert!(text.contains("the agent cannot run here"), "{text}");
}

#[test]
fn the_agent_without_privileges_refuses_to_start_with_a_clear_message() {
    let out = unprivileged("agent");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("needs root"), "{log}");
}
