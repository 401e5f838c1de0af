//! hoptrace: per-hop latency from the kernel, as OpenTelemetry spans.

mod agent;
mod check;
mod clock;
mod conn_spans;
mod containers;
mod correlate;
mod decode;
mod early_receives;
mod ebpf;
mod export;
mod go_tls;
mod golang;
mod kernel_offsets;
mod listeners;
mod metrics;
mod nic;
mod requests;
mod sampling;
mod scope;
mod settings;
mod span;
mod tls_handshake;
mod tls_uprobes;
mod tracefs;

use std::process::ExitCode;

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
            let options = settings.agent_options();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(agent::run(options)))
                .map(|()| ExitCode::SUCCESS)
        }
    };
    outcome.unwrap_or_else(|error| {
        log::error!("{error:#}");
        ExitCode::FAILURE
    })
}
