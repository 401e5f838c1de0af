//! hoptrace: per-hop latency from the kernel, as OpenTelemetry spans.

mod agent;
mod check;
mod clock;
mod clock_offset;
mod conn_spans;
mod containers;
mod correlate;
mod correlator;
mod decode;
mod early_receives;
mod ebpf;
mod export;
mod go_tls;
mod golang;
mod http2;
mod kernel_features;
mod kernel_offsets;
mod kubernetes;
mod listeners;
mod metrics;
mod nic;
mod requests;
mod sampling;
mod scope;
mod settings;
mod span;
mod tls_handshake;
mod tls_library;
mod tls_uprobes;
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
    /// OTEL_TRACES_EXPORTER and OTEL_BSP_* are honored. Precedence: flags > environment >
    /// config file > defaults.
    Agent(Box<settings::AgentArgs>),
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

/// Runs a command's main task on a two-thread tokio runtime.
fn run_async(
    task: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(task))
        .map(|()| ExitCode::SUCCESS)
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
        Command::Agent(args) => {
            let print = args.print_config;
            let settings = match settings::Settings::load(*args) {
                Ok(settings) => settings,
                Err(error) => {
                    log::error!("configuration: {error:#}");
                    return ExitCode::from(2);
                }
            };
            if print {
                print!("{}", settings.render());
                return ExitCode::SUCCESS;
            }
            match settings.agent_options() {
                Ok(options) => run_async(agent::run(options)),
                Err(error) => {
                    log::error!("configuration: {error:#}");
                    return ExitCode::from(2);
                }
            }
        }
        Command::Correlate {
            grpc_listen,
            http_listen,
            join_window,
            join_max_pending,
            otlp_endpoint,
            otlp_protocol,
            shutdown_timeout,
        } => run_async(correlator::run(correlator::CorrelateOptions {
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
        })),
    };
    outcome.unwrap_or_else(|error| {
        log::error!("{error:#}");
        ExitCode::FAILURE
    })
}
