//! `hoptrace check`: what this kernel really allows, found by loading, attaching and triggering
//! a tiny program per hook kind (a config option, lockdown or a missing mount can each forbid
//! one), then the probe plan `hoptrace agent` will use. Exit status 0 when everything the agent
//! requires works.

use std::{io::Write as _, net::UdpSocket, path::Path, process::Command, time::Duration};

use anyhow::Context as _;
use aya::{
    Btf, Ebpf,
    maps::Array,
    programs::{
        BtfTracePoint, FEntry, KProbe, SchedClassifier, TcAttachType, TracePoint, UProbe,
        uprobe::UProbeScope,
    },
};

use crate::{
    ebpf::{self, Layer},
    kernel_features, kernel_offsets,
    scope::Scope,
    tls_uprobes, tracefs,
};

/// Called by the uprobe check through its symbol; must stay a real, exported function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn hoptrace_check_uprobe_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_add(1)
}

/// The finding about the Go TLS join's kernel helpers.
const GO_TLS_HELPERS: &str = "bpf_task_pt_regs";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// The agent cannot run without it.
    Required,
    /// A later layer or an optional accelerator uses it; its absence degrades, never fails.
    Optional,
}

struct Finding {
    what: &'static str,
    need: Need,
    used_for: &'static str,
    outcome: Result<String, String>,
}

pub fn run() -> anyhow::Result<bool> {
    let mut findings = Vec::new();
    findings.push(Finding {
        what: "privileges",
        need: Need::Required,
        used_for: "loading eBPF programs",
        outcome: ebpf::require_privilege()
            .map(|()| privileges())
            .map_err(|e| format!("{}: {e}", privileges())),
    });
    let offsets = kernel_offsets::resolve();
    findings.push(Finding {
        what: "kernel BTF",
        need: Need::Required,
        used_for: "struct offsets for socket netns, error and RTT",
        outcome: offsets
            .as_ref()
            .map(|o| {
                format!(
                    "{} (sock.skc_net at {}, tcp_sock.srtt_us at {})",
                    kernel_offsets::VMLINUX_BTF,
                    o.sock_net,
                    o.tcp_srtt_us
                )
            })
            .map_err(|e| e.to_string()),
    });
    findings.push(Finding {
        what: "tracefs",
        need: Need::Required,
        used_for: "tracepoint formats",
        outcome: tracefs::mount_point()
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string()),
    });
    findings.push(Finding {
        what: "bpffs",
        need: Need::Optional,
        used_for: "pinning maps across restarts (not used yet)",
        outcome: if is_mount_point("/sys/fs/bpf", "bpf") {
            Ok("/sys/fs/bpf".into())
        } else {
            Err("not mounted at /sys/fs/bpf: `mount -t bpf bpf /sys/fs/bpf`".into())
        },
    });
    for layer in [Layer::Connections, Layer::Requests, Layer::TcpArrival] {
        let probes: Vec<_> = ebpf::agent_probes()
            .into_iter()
            .filter(|p| p.layer == layer)
            .collect();
        let outcome = probes
            .iter()
            .try_for_each(|p| tracefs::verify_layout(p.category, p.name, p.layout))
            .map(|()| {
                let names: Vec<_> = probes
                    .iter()
                    .map(|p| format!("{}:{}", p.category, p.name))
                    .collect();
                format!(
                    "{} tracepoints present, layouts match ({} ...)",
                    names.len(),
                    names[0]
                )
            })
            .map_err(|e| e.to_string());
        findings.push(Finding {
            what: "tracepoints",
            need: if layer == Layer::Connections {
                Need::Required
            } else {
                Need::Optional
            },
            used_for: layer.describe(),
            outcome,
        });
    }

    findings.push(Finding {
        what: GO_TLS_HELPERS,
        need: Need::Optional,
        used_for: "Go TLS plaintext (joins a goroutine's call to its socket)",
        outcome: kernel_features::go_tls_join()
            .clone()
            .map(|()| "bpf_get_current_task_btf and bpf_task_pt_regs load".into())
            .map_err(|why| kernel_features::go_tls_unavailable(&why)),
    });

    let offsets = offsets.unwrap_or_default();
    // The smallest ring buffer: check attaches probes, it reads no records.
    match ebpf::load_object(&Scope::default(), &offsets, 4096) {
        Ok(mut object) => probe_hooks(&mut object, &mut findings),
        Err(e) => findings.push(Finding {
            what: "eBPF object",
            need: Need::Required,
            used_for: "everything",
            outcome: Err(format!("{e:#}")),
        }),
    }
    report(&findings);
    Ok(findings
        .iter()
        .all(|f| f.need == Need::Optional || f.outcome.is_ok()))
}

/// The capabilities of deploy/README.md's "Capabilities" table.
const CAPABILITIES: [ebpf::Capability; 6] = [
    ebpf::BPF,
    ebpf::PERFMON,
    ebpf::NET_ADMIN,
    ebpf::SYS_PTRACE,
    ebpf::DAC_READ_SEARCH,
    ebpf::SYS_ADMIN,
];

/// `uid 0, CAP_BPF CAP_PERFMON ...; without CAP_SYS_ADMIN`: which of the agent's capabilities
/// this process has. In a container root has only those added, so uid 0 alone says little.
fn privileges() -> String {
    let effective = ebpf::effective_capabilities();
    let (have, lack): (Vec<_>, Vec<_>) = CAPABILITIES
        .iter()
        .partition(|&&cap| ebpf::holds(effective, cap));
    let names = |caps: &[&ebpf::Capability]| {
        let names: Vec<_> = caps.iter().map(|(_, name)| *name).collect();
        names.join(" ")
    };
    let mut text = format!("uid {}", unsafe { libc::geteuid() });
    if !have.is_empty() {
        text += &format!(", {}", names(&have));
    }
    if !lack.is_empty() {
        text += &format!("; without {}", names(&lack));
    }
    text
}

fn probe_hooks(object: &mut Ebpf, findings: &mut Vec<Finding>) {
    let btf = Btf::from_sys_fs().ok();
    let mut hook =
        |what, need, used_for, index: u32, attach: &dyn Fn(&mut Ebpf) -> anyhow::Result<()>| {
            let outcome = attach(object).and_then(|()| {
                let hits = hits(object, index)?;
                anyhow::ensure!(hits > 0, "attached but never fired");
                Ok(format!("attached and fired ({hits} hits)"))
            });
            findings.push(Finding {
                what,
                need,
                used_for,
                outcome: outcome.map_err(|e| format!("{e:#}")),
            });
        };
    hook(
        "tracepoint",
        Need::Required,
        "connection lifecycle (sock:inet_sock_set_state)",
        0,
        &|o| {
            let p: &mut TracePoint = program(o, "check_tracepoint")?;
            p.load()?;
            let link = p.attach("syscalls", "sys_enter_getppid")?;
            unsafe { libc::getppid() };
            p.detach(link)?;
            Ok(())
        },
    );
    hook(
        "tp_btf",
        Need::Optional,
        "typed hooks (not used yet)",
        1,
        &|o| {
            let btf = btf.as_ref().context("no kernel BTF")?;
            let p: &mut BtfTracePoint = program(o, "check_tp_btf")?;
            p.load("sys_enter", btf)?;
            let link = p.attach()?;
            unsafe { libc::getppid() };
            p.detach(link)?;
            Ok(())
        },
    );
    hook(
        "uprobe",
        Need::Optional,
        "TLS plaintext (OpenSSL, Go crypto/tls)",
        2,
        &|o| {
            let p: &mut UProbe = program(o, "check_uprobe")?;
            p.load()?;
            let exe = std::env::current_exe()?;
            let link = p
                .attach(
                    ["hoptrace_check_uprobe_target"],
                    &exe,
                    UProbeScope::CallingProcess,
                )
                .map_err(|e| ebpf::explain_uprobe_error(e.into()))?;
            hoptrace_check_uprobe_target(1);
            p.detach(link)?;
            Ok(())
        },
    );
    hook(
        "tc (tcx/clsact)",
        Need::Optional,
        "NIC layer: segment times by TCP sequence",
        3,
        &|o| check_tc(o),
    );
    hook(
        "kprobe",
        Need::Optional,
        "faster socket hooks (optional accelerator)",
        4,
        &|o| {
            let p: &mut KProbe = program(o, "check_kprobe")?;
            p.load()?;
            let link = p.attach("tcp_connect", 0)?;
            p.detach(link)?;
            anyhow::bail!("attached; not triggered on purpose")
        },
    );
    hook(
        "fentry",
        Need::Optional,
        "faster socket hooks (optional accelerator)",
        5,
        &|o| {
            let btf = btf.as_ref().context("no kernel BTF")?;
            let p: &mut FEntry = program(o, "check_fentry")?;
            p.load("tcp_connect", btf)?;
            let link = p.attach()?;
            p.detach(link)?;
            anyhow::bail!("attached; not triggered on purpose")
        },
    );
    // kprobe and fentry are judged by attaching alone: an attach that succeeds is what counts.
    for finding in findings.iter_mut() {
        if let Err(e) = &finding.outcome
            && e.starts_with("attached; not triggered")
        {
            finding.outcome = Ok("attached".into());
        }
    }
}

/// Attaches the tc probe to `lo` inside a throwaway network namespace (so the host's
/// interfaces are never touched), sends one packet through it, and detaches.
fn check_tc(object: &mut Ebpf) -> anyhow::Result<()> {
    let p: &mut SchedClassifier = program(object, "check_tc")?;
    p.load()?;
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<()> {
            // unshare on this thread only: the namespace dies with the thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
            }
            let up = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()?;
            anyhow::ensure!(up.success(), "ip link set lo up failed");
            let link = p.attach(c"lo", TcAttachType::Ingress)?;
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.send_to(b"hoptrace check", "127.0.0.1:9")?;
            std::thread::sleep(Duration::from_millis(10));
            p.detach(link)?;
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("tc check thread panicked"))?
    })
}

fn program<'a, T>(object: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = object
        .program_mut(name)
        .with_context(|| format!("{name} missing from the object"))?;
    Ok(program.try_into()?)
}

fn hits(object: &Ebpf, index: u32) -> anyhow::Result<u64> {
    let map: Array<_, u64> =
        Array::try_from(object.map("CHECK_HITS").context("CHECK_HITS missing")?)?;
    Ok(map.get(&index, 0)?)
}

fn is_mount_point(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|l| {
            let mut fields = l.split_whitespace();
            fields.nth(1) == Some(path) && fields.next() == Some(fstype)
        })
    }) && Path::new(path).is_dir()
}

fn report(findings: &[Finding]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<18} {:<9} {:<8} {:<50} detail",
        "check", "need", "result", "used for"
    );
    for f in findings {
        let need = if f.need == Need::Required {
            "required"
        } else {
            "optional"
        };
        let (result, detail) = match &f.outcome {
            Ok(d) => ("works", d.as_str()),
            Err(e) => (
                if f.need == Need::Required {
                    "MISSING"
                } else {
                    "absent"
                },
                e.as_str(),
            ),
        };
        let _ = writeln!(
            out,
            "{:<18} {:<9} {:<8} {:<50} {}",
            f.what, need, result, f.used_for, detail
        );
    }
    let works = |what: &str| findings.iter().any(|f| f.what == what && f.outcome.is_ok());
    let _ = writeln!(out, "\nprobe plan of `hoptrace agent`:");
    for layer in [Layer::Connections, Layer::Requests, Layer::TcpArrival] {
        let ready = works("tracepoint")
            && findings.iter().any(|f| {
                f.what == "tracepoints" && f.used_for == layer.describe() && f.outcome.is_ok()
            });
        let hooks: Vec<_> = ebpf::agent_probes()
            .into_iter()
            .filter(|p| p.layer == layer)
            .map(|p| format!("{}:{}", p.category, p.name))
            .collect();
        let hooks = if hooks.len() > 3 {
            format!("{} and {} more", hooks[..2].join(", "), hooks.len() - 2)
        } else {
            hooks.join(", ")
        };
        let status = match (ready, layer) {
            (true, _) => "ready",
            (false, Layer::Connections) => "UNAVAILABLE",
            (false, _) => "absent: the agent runs without this layer",
        };
        let _ = writeln!(out, "  {:<56} [{status}] {hooks}", layer.describe());
    }
    let nic = if works("tc (tcx/clsact)") {
        "[ready]"
    } else {
        "[absent: the agent runs without this layer]"
    };
    let _ = writeln!(
        out,
        "  {:<56} {nic} tc egress/ingress on the observed namespaces' interfaces",
        "NIC layer"
    );
    let tls = if works("uprobe") {
        "[ready]"
    } else {
        "[absent: the agent runs without this layer]"
    };
    let _ = writeln!(
        out,
        "  {:<56} {tls} {}",
        "TLS plaintext (OpenSSL uprobes)",
        tls_uprobes::HOOKS
    );
    let go_tls = match findings.iter().find(|f| f.what == GO_TLS_HELPERS) {
        Some(Finding {
            outcome: Err(why), ..
        }) => format!("[absent: {why}]"),
        _ if works("uprobe") => "[ready]".into(),
        _ => "[absent: the agent runs without this layer]".into(),
    };
    let _ = writeln!(
        out,
        "  {:<56} {go_tls} uprobes on crypto/tls.(*Conn).Write/Read, joined in the syscall layer",
        "TLS plaintext (Go crypto/tls uprobes)"
    );
    let accelerators = if works("fentry") || works("kprobe") {
        "available (not needed: the agent stands on tracepoints)"
    } else {
        "none on this kernel (not needed: the agent stands on tracepoints)"
    };
    let _ = writeln!(out, "  {:<56} {accelerators}", "kprobe/fentry accelerators");
    let missing: Vec<_> = findings
        .iter()
        .filter(|f| f.need == Need::Required && f.outcome.is_err())
        .map(|f| {
            format!(
                "{}: {}",
                f.what,
                f.outcome.as_ref().err().map(String::as_str).unwrap_or("")
            )
        })
        .collect();
    if missing.is_empty() {
        let _ = writeln!(out, "\nresult: every required hook works");
    } else {
        let _ = writeln!(out, "\nresult: the agent cannot run here:");
        for m in missing {
            let _ = writeln!(out, "  - {m}");
        }
    }
}
