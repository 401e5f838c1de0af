//! hoptrace: per-hop latency from the kernel, as OpenTelemetry spans.

mod agent;
mod check;
mod clock;
mod clock_offset;
mod conn_spans;
mod correlate;
mod correlator;
mod decode;
mod ebpf;
mod export;
mod kernel_offsets;
mod listeners;
mod nic;
mod requests;
mod sampling;
mod scope;
mod span;
mod tracefs;

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hoptrace",
    version,
    about = "Per-hop latency from the kernel, as OpenTelemetry spans"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Probe what this kernel allows (load, attach and trigger a program per hook kind) and
    /// print the agent's probe plan. Exits non-zero when a required hook is missing.
    Check,
    /// Trace TCP connections (and, as layers land, requests) and export spans.
    ///
    /// Export: OTLP when OTEL_EXPORTER_OTLP_ENDPOINT (or --otlp-endpoint) is set, with
    /// OTEL_EXPORTER_OTLP_PROTOCOL grpc | http/protobuf (default) | http/json; otherwise spans
    /// print to the terminal. OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_SDK_DISABLED,
    /// OTEL_TRACES_EXPORTER and OTEL_BSP_* are honored.
    Agent {
        /// Observe only this network namespace: a name as `ip netns` shows it, or a path such as
        /// /proc/PID/ns/net. Repeatable. Default: every namespace.
        #[arg(
            long = "netns",
            value_name = "NAME|PATH",
            env = "HOPTRACE_NETNS",
            value_delimiter = ','
        )]
        netns: Vec<String>,
        /// Observe only sockets of this process id (connecting or listening). Repeatable.
        #[arg(
            long = "pid",
            value_name = "PID",
            env = "HOPTRACE_PIDS",
            value_delimiter = ','
        )]
        pids: Vec<u32>,
        /// Observe only connections with this local or remote TCP port. Repeatable.
        #[arg(
            long = "port",
            value_name = "PORT",
            env = "HOPTRACE_PORTS",
            value_delimiter = ','
        )]
        ports: Vec<u16>,
        /// OTLP endpoint; overrides OTEL_EXPORTER_OTLP_ENDPOINT.
        #[arg(long, value_name = "URL")]
        otlp_endpoint: Option<String>,
        /// OTLP protocol: grpc, http/protobuf or http/json; overrides OTEL_EXPORTER_OTLP_PROTOCOL.
        #[arg(long, value_name = "PROTOCOL")]
        otlp_protocol: Option<String>,
        /// Requests without a (valid) traceparent: `new-trace` starts a trace for them, marked
        /// hoptrace.trace_origin = "hoptrace"; `ignore` exports nothing for them (counted).
        #[arg(long, env = "HOPTRACE_UNTRACED", default_value = "new-trace", value_parser = sampling::Untraced::parse)]
        untraced: sampling::Untraced,
        /// Also export the persona's kernel receive / application / kernel send as child spans
        /// (their durations are always attributes of the persona span).
        #[arg(long, env = "HOPTRACE_LAYER_SPANS")]
        layer_spans: bool,
        /// Size of the kernel -> agent ring buffer in MiB (a power of two); a full buffer drops
        /// records, counted, and never blocks the traced application.
        #[arg(long, env = "HOPTRACE_RING_BUFFER_MIB", default_value_t = 4, value_parser = ring_buffer_mib)]
        ring_buffer_mib: u32,
        /// How long stopping may take to flush pending spans, in seconds.
        #[arg(
            long,
            default_value_t = 5.0,
            value_name = "SECONDS",
            env = "HOPTRACE_SHUTDOWN_TIMEOUT"
        )]
        shutdown_timeout: f64,
    },
    /// Join two hosts' agents: an OTLP receiver (gRPC and HTTP/protobuf or JSON) that passes
    /// every span on and adds the firewall spans when both sides of a request have arrived.
    ///
    /// Export as for `agent` (OTEL_* variables; the terminal without an endpoint).
    Correlate {
        /// Where to receive OTLP/gRPC (OTLP/HTTP is understood there too).
        #[arg(long, default_value = "0.0.0.0:4317", env = "HOPTRACE_GRPC_LISTEN")]
        grpc_listen: std::net::SocketAddr,
        /// Where to receive OTLP/HTTP (gRPC is understood there too).
        #[arg(long, default_value = "0.0.0.0:4318", env = "HOPTRACE_HTTP_LISTEN")]
        http_listen: std::net::SocketAddr,
        /// How long a request's first side waits for the other, in seconds of arrival time
        /// (longer than the agents' export delay, OTEL_BSP_SCHEDULE_DELAY).
        #[arg(
            long,
            default_value_t = 30.0,
            value_name = "SECONDS",
            env = "HOPTRACE_JOIN_WINDOW"
        )]
        join_window: f64,
        /// At most this many requests wait for their other side; beyond, the oldest are
        /// evicted (counted).
        #[arg(long, default_value_t = 65_536, env = "HOPTRACE_JOIN_MAX_PENDING")]
        join_max_pending: usize,
        /// OTLP endpoint to export to; overrides OTEL_EXPORTER_OTLP_ENDPOINT.
        #[arg(long, value_name = "URL")]
        otlp_endpoint: Option<String>,
        /// OTLP protocol: grpc, http/protobuf or http/json; overrides OTEL_EXPORTER_OTLP_PROTOCOL.
        #[arg(long, value_name = "PROTOCOL")]
        otlp_protocol: Option<String>,
        /// How long stopping may take to flush pending spans, in seconds.
        #[arg(
            long,
            default_value_t = 5.0,
            value_name = "SECONDS",
            env = "HOPTRACE_SHUTDOWN_TIMEOUT"
        )]
        shutdown_timeout: f64,
    },
}

fn ring_buffer_mib(value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(mib) if mib.is_power_of_two() && mib <= 1024 => Ok(mib),
        _ => Err(format!(
            "{value:?}: the ring buffer size must be a power of two from 1 to 1024 MiB"
        )),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Check => check::run().map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
        Command::Agent {
            netns,
            pids,
            ports,
            otlp_endpoint,
            otlp_protocol,
            untraced,
            layer_spans,
            ring_buffer_mib,
            shutdown_timeout,
        } => {
            let options = agent::AgentOptions {
                scope_netns: netns,
                scope_pids: pids,
                scope_ports: ports,
                export: export::ExportFlags {
                    endpoint: otlp_endpoint,
                    protocol: otlp_protocol,
                },
                untraced,
                layer_spans,
                ring_buffer_bytes: ring_buffer_mib << 20,
                shutdown_timeout: Duration::from_secs_f64(shutdown_timeout.clamp(0.0, 600.0)),
                report_interval: Duration::from_secs(10),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(agent::run(options)))
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Correlate {
            grpc_listen,
            http_listen,
            join_window,
            join_max_pending,
            otlp_endpoint,
            otlp_protocol,
            shutdown_timeout,
        } => {
            let options = correlator::CorrelateOptions {
                grpc_listen,
                http_listen,
                export: export::ExportFlags {
                    endpoint: otlp_endpoint,
                    protocol: otlp_protocol,
                },
                join: correlate::Config {
                    window_ns: (join_window.clamp(0.001, 86_400.0) * 1e9) as u64,
                    max_pending: join_max_pending.max(1),
                    ..correlate::Config::default()
                },
                queue: 1024,
                shutdown_timeout: Duration::from_secs_f64(shutdown_timeout.clamp(0.0, 600.0)),
                report_interval: Duration::from_secs(10),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(correlator::run(options)))
                .map(|()| ExitCode::SUCCESS)
        }
    };
    outcome.unwrap_or_else(|error| {
        log::error!("{error:#}");
        ExitCode::FAILURE
    })
}
