//! The agent's configuration from four layers, highest first: command-line flags, environment
//! variables, a TOML config file (`--config PATH` or HOPTRACE_CONFIG), built-in defaults.
//!
//! Every setting has one key in the file, one environment variable (OTEL_* where the
//! OpenTelemetry SDK spec defines one, HOPTRACE_* otherwise) and, for the common ones, a flag.
//! An empty environment variable counts as unset (Kubernetes ConfigMaps often carry them).
//! Errors name the key and the layer the bad value came from; an unknown key in the file is an
//! error, not ignored. `--print-config` shows every value with its layer, as a config file.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde::Deserialize;

use crate::{
    agent::AgentOptions,
    export::{ExportConfig, ExportFlags, Protocol},
    kubernetes,
    sampling::Untraced,
};

/// `hoptrace agent`'s flags. None of them has a default here: a flag left out falls through to
/// the environment, the file, then the default, and `--print-config` can tell which it was.
#[derive(clap::Args, Debug, Default)]
pub struct AgentArgs {
    /// TOML config file (keys: deploy/README.md, "Configuration"). Default: HOPTRACE_CONFIG, or
    /// none. Flags override the environment, which overrides the file.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration, each value with where it came from, and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Observe only this network namespace: a name as `ip netns` shows it, or a path such as
    /// /proc/PID/ns/net. Repeatable. Default: every namespace. [env: HOPTRACE_NETNS]
    #[arg(long = "netns", value_name = "NAME|PATH", value_delimiter = ',')]
    pub netns: Vec<String>,
    /// Observe only sockets of this process id (connecting or listening). Repeatable.
    /// [env: HOPTRACE_PIDS]
    #[arg(long = "pid", value_name = "PID", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Observe only connections with this local or remote TCP port. Repeatable.
    /// [env: HOPTRACE_PORTS]
    #[arg(long = "port", value_name = "PORT", value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// OTLP endpoint; overrides OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol: grpc, http/protobuf or http/json; overrides OTEL_EXPORTER_OTLP_PROTOCOL.
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Requests without a (valid) traceparent: `new-trace` (default) starts a trace for them,
    /// marked hoptrace.trace_origin = "hoptrace"; `ignore` exports nothing for them (counted).
    /// [env: HOPTRACE_UNTRACED]
    #[arg(long, value_name = "POLICY")]
    pub untraced: Option<String>,
    /// Also export the persona's kernel receive / application / kernel send as child spans
    /// (their durations are always attributes of the persona span). [env: HOPTRACE_LAYER_SPANS]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub layer_spans: Option<bool>,
    /// Size of the kernel -> agent ring buffer in MiB (a power of two, default 4); a full
    /// buffer drops records, counted, and never blocks the traced application.
    /// [env: HOPTRACE_RING_BUFFER_MIB]
    #[arg(long, value_name = "MIB")]
    pub ring_buffer_mib: Option<u32>,
    /// How long stopping may take to flush pending spans, in seconds (default 5).
    /// [env: HOPTRACE_SHUTDOWN_TIMEOUT]
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_timeout: Option<f64>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 0.0.0.0:9464. Default: off.
    /// [env: HOPTRACE_METRICS_ADDR]
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Name the pods of traced processes (k8s.pod.name, k8s.namespace.name,
    /// k8s.container.name) from the Kubernetes API server, with the pod's service account;
    /// needs node_name. [env: HOPTRACE_KUBERNETES_API]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub kubernetes_api: Option<bool>,
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag(&'static str),
    Env(&'static str),
    File(PathBuf),
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flag(flag) => write!(f, "flag --{flag}"),
            Self::Env(var) => write!(f, "env {var}"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Default => f.write_str("default"),
        }
    }
}

/// One resolved value and its layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
}

/// The config file. Keys mirror the flags; `[export]` mirrors the OTEL_* variables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    scope: FileScope,
    untraced: Option<String>,
    layer_spans: Option<bool>,
    ring_buffer_mib: Option<u32>,
    shutdown_timeout: Option<f64>,
    metrics_addr: Option<String>,
    node_name: Option<String>,
    #[serde(default)]
    kubernetes: FileKubernetes,
    #[serde(default)]
    export: FileExport,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKubernetes {
    api: Option<bool>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileScope {
    netns: Option<Vec<String>>,
    pids: Option<Vec<u32>>,
    ports: Option<Vec<u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExport {
    endpoint: Option<String>,
    protocol: Option<String>,
    exporter: Option<String>,
    disabled: Option<bool>,
    service_name: Option<String>,
    resource_attributes: Option<BTreeMap<String, String>>,
    max_queue_size: Option<u64>,
    max_export_batch_size: Option<u64>,
    schedule_delay_ms: Option<u64>,
    export_timeout_ms: Option<u64>,
}

/// `[export]` keys and the OpenTelemetry variables they stand for.
const EXPORT_KEYS: &[(&str, &str)] = &[
    ("endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ("protocol", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ("exporter", "OTEL_TRACES_EXPORTER"),
    ("disabled", "OTEL_SDK_DISABLED"),
    ("service_name", "OTEL_SERVICE_NAME"),
    ("max_queue_size", "OTEL_BSP_MAX_QUEUE_SIZE"),
    ("max_export_batch_size", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
    ("schedule_delay_ms", "OTEL_BSP_SCHEDULE_DELAY"),
    ("export_timeout_ms", "OTEL_BSP_EXPORT_TIMEOUT"),
];

impl FileExport {
    /// The file's value for an OTEL_* variable, as the variable would spell it.
    fn as_env(&self, var: &str) -> Option<String> {
        let number = |n: Option<u64>| n.map(|n| n.to_string());
        match var {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => self.endpoint.clone(),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => self.protocol.clone(),
            "OTEL_TRACES_EXPORTER" => self.exporter.clone(),
            "OTEL_SDK_DISABLED" => self.disabled.map(|d| d.to_string()),
            "OTEL_SERVICE_NAME" => self.service_name.clone(),
            "OTEL_BSP_MAX_QUEUE_SIZE" => number(self.max_queue_size),
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" => number(self.max_export_batch_size),
            "OTEL_BSP_SCHEDULE_DELAY" => number(self.schedule_delay_ms),
            "OTEL_BSP_EXPORT_TIMEOUT" => number(self.export_timeout_ms),
            _ => None,
        }
    }
}

/// The effective configuration of `hoptrace agent`.
#[derive(Debug)]
pub struct Settings {
    pub netns: Setting<Vec<String>>,
    pub pids: Setting<Vec<u32>>,
    pub ports: Setting<Vec<u16>>,
    pub untraced: Setting<Untraced>,
    pub layer_spans: Setting<bool>,
    pub ring_buffer_mib: Setting<u32>,
    pub shutdown_timeout: Setting<f64>,
    pub metrics_addr: Setting<Option<SocketAddr>>,
    /// The Kubernetes node (downward API `spec.nodeName`): resource attribute k8s.node.name.
    pub node_name: Setting<Option<String>>,
    /// Pod names from the API server, and the service account files it is reached with.
    pub kubernetes_api: Setting<bool>,
    pub kubernetes_token_file: Setting<PathBuf>,
    pub kubernetes_ca_file: Setting<PathBuf>,
    /// https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT, or why there is none.
    kubernetes_server: Result<String, String>,
    pub export: ExportConfig,
    /// `[export]` keys as resolved, for --print-config: key, value, layer.
    export_sources: Vec<(&'static str, String, Source)>,
    config_file: Option<PathBuf>,
}

/// Resolves one setting: flag, else environment, else file, else default. `parse` reads the
/// environment's string; `check` validates whichever value won, so the error can name its layer.
/// Reads a setting from an environment variable's text.
type Parse<T> = fn(&str) -> Result<T, String>;

struct Layers<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    file_path: Option<&'a Path>,
}

impl Layers<'_> {
    #[allow(clippy::too_many_arguments)]
    fn resolve<T>(
        &self,
        key: &str,
        flag: (&'static str, Option<T>),
        env: (&'static str, Parse<T>),
        file: Option<T>,
        default: T,
        check: fn(&T) -> Result<(), String>,
    ) -> anyhow::Result<Setting<T>> {
        let (var, parse) = env;
        let setting = if let Some(value) = flag.1 {
            Setting {
                value,
                source: Source::Flag(flag.0),
            }
        } else if let Some(text) = (self.env)(var) {
            let value = parse(text.trim())
                .map_err(|e| anyhow::anyhow!("{key}: {var}={text:?}: {e} (from env {var})"))?;
            Setting {
                value,
                source: Source::Env(var),
            }
        } else if let (Some(value), Some(path)) = (file, self.file_path) {
            Setting {
                value,
                source: Source::File(path.to_path_buf()),
            }
        } else {
            Setting {
                value: default,
                source: Source::Default,
            }
        };
        check(&setting.value)
            .map_err(|e| anyhow::anyhow!("{key}: {e} (from {})", setting.source))?;
        Ok(setting)
    }
}

fn list<T: std::str::FromStr>(text: &str) -> Result<Vec<T>, String>
where
    T::Err: fmt::Display,
{
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| item.parse().map_err(|e| format!("{item:?}: {e}")))
        .collect()
}

fn boolean(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("not a boolean (true or false)".into()),
    }
}

fn parsed<T: std::str::FromStr>(text: &str) -> Result<T, String>
where
    T::Err: fmt::Display,
{
    text.parse().map_err(|e: T::Err| e.to_string())
}

fn ring_buffer_check(mib: &u32) -> Result<(), String> {
    if mib.is_power_of_two() && *mib <= 1024 {
        Ok(())
    } else {
        Err(format!("{mib} is not a power of two from 1 to 1024 (MiB)"))
    }
}

fn shutdown_check(seconds: &f64) -> Result<(), String> {
    if seconds.is_finite() && (0.0..=600.0).contains(seconds) {
        Ok(())
    } else {
        Err(format!(
            "{seconds} is not a number of seconds from 0 to 600"
        ))
    }
}

/// A repeatable flag given zero times is not given.
fn non_empty<T>(values: Vec<T>) -> Option<Vec<T>> {
    (!values.is_empty()).then_some(values)
}

fn always_ok<T>(_: &T) -> Result<(), String> {
    Ok(())
}

fn untraced_name(untraced: Untraced) -> &'static str {
    match untraced {
        Untraced::Ignore => "ignore",
        Untraced::NewTrace => "new-trace",
    }
}

impl Settings {
    /// Reads the process environment and the config file it or the flags name.
    pub fn load(args: AgentArgs) -> anyhow::Result<Self> {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.trim().is_empty());
        let path = args
            .config
            .clone()
            .or_else(|| env("HOPTRACE_CONFIG").map(PathBuf::from));
        let file = match &path {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?,
            ),
            None => None,
        };
        Self::resolve(args, &env, path.as_deref().zip(file.as_deref()))
    }

    /// `env` reads one variable (empty counts as unset); `file` is the config file's path and
    /// text. Separate from the process for tests.
    pub fn resolve(
        args: AgentArgs,
        env: &dyn Fn(&str) -> Option<String>,
        file: Option<(&Path, &str)>,
    ) -> anyhow::Result<Self> {
        let parsed_file: File = match file {
            Some((path, text)) => toml::from_str(text)
                .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?,
            None => File::default(),
        };
        let layers = Layers {
            env,
            file_path: file.map(|(path, _)| path),
        };
        let f = parsed_file;
        let netns = layers.resolve(
            "scope.netns",
            ("netns", non_empty(args.netns)),
            ("HOPTRACE_NETNS", list::<String>),
            f.scope.netns,
            Vec::new(),
            always_ok,
        )?;
        let pids = layers.resolve(
            "scope.pids",
            ("pid", non_empty(args.pids)),
            ("HOPTRACE_PIDS", list::<u32>),
            f.scope.pids,
            Vec::new(),
            always_ok,
        )?;
        let ports = layers.resolve(
            "scope.ports",
            ("port", non_empty(args.ports)),
            ("HOPTRACE_PORTS", list::<u16>),
            f.scope.ports,
            Vec::new(),
            always_ok,
        )?;
        let untraced_flag = args
            .untraced
            .as_deref()
            .map(Untraced::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("untraced: {e} (from flag --untraced)"))?;
        let untraced_file = match (&f.untraced, layers.file_path) {
            (Some(text), Some(path)) => Some(
                Untraced::parse(text)
                    .map_err(|e| anyhow::anyhow!("untraced: {e} (from file {})", path.display()))?,
            ),
            _ => None,
        };
        let untraced = layers.resolve(
            "untraced",
            ("untraced", untraced_flag),
            ("HOPTRACE_UNTRACED", Untraced::parse),
            untraced_file,
            Untraced::NewTrace,
            always_ok,
        )?;
        let layer_spans = layers.resolve(
            "layer_spans",
            ("layer-spans", args.layer_spans),
            ("HOPTRACE_LAYER_SPANS", boolean),
            f.layer_spans,
            false,
            always_ok,
        )?;
        let ring_buffer_mib = layers.resolve(
            "ring_buffer_mib",
            ("ring-buffer-mib", args.ring_buffer_mib),
            ("HOPTRACE_RING_BUFFER_MIB", parsed::<u32>),
            f.ring_buffer_mib,
            4,
            ring_buffer_check,
        )?;
        let shutdown_timeout = layers.resolve(
            "shutdown_timeout",
            ("shutdown-timeout", args.shutdown_timeout),
            ("HOPTRACE_SHUTDOWN_TIMEOUT", parsed::<f64>),
            f.shutdown_timeout,
            5.0,
            shutdown_check,
        )?;
        let metrics_file = match (&f.metrics_addr, layers.file_path) {
            (Some(text), Some(path)) => Some(Some(text.parse::<SocketAddr>().map_err(|e| {
                anyhow::anyhow!("metrics_addr: {text:?}: {e} (from file {})", path.display())
            })?)),
            _ => None,
        };
        let metrics_addr = layers.resolve(
            "metrics_addr",
            ("metrics-addr", args.metrics_addr.map(Some)),
            ("HOPTRACE_METRICS_ADDR", |t| {
                parsed::<SocketAddr>(t).map(Some)
            }),
            metrics_file,
            None,
            always_ok,
        )?;
        let node_name = layers.resolve(
            "node_name",
            ("", None),
            ("HOPTRACE_NODE_NAME", |t| Ok(Some(t.to_string()))),
            f.node_name.map(Some),
            None,
            always_ok,
        )?;

        let kubernetes_api = layers.resolve(
            "kubernetes.api",
            ("kubernetes-api", args.kubernetes_api),
            ("HOPTRACE_KUBERNETES_API", boolean),
            f.kubernetes.api,
            false,
            always_ok,
        )?;
        let kubernetes_token_file = layers.resolve(
            "kubernetes.token_file",
            ("", None),
            ("HOPTRACE_KUBERNETES_TOKEN_FILE", |t| Ok(PathBuf::from(t))),
            f.kubernetes.token_file,
            PathBuf::from(kubernetes::TOKEN_FILE),
            always_ok,
        )?;
        let kubernetes_ca_file = layers.resolve(
            "kubernetes.ca_file",
            ("", None),
            ("HOPTRACE_KUBERNETES_CA_FILE", |t| Ok(PathBuf::from(t))),
            f.kubernetes.ca_file,
            PathBuf::from(kubernetes::CA_FILE),
            always_ok,
        )?;
        let kubernetes_server = kubernetes::ApiConfig::in_cluster_server(env);

        // Export: the OTEL_* variables, each falling back to its [export] key.
        let file_source = layers
            .file_path
            .map_or(Source::Default, |p| Source::File(p.to_path_buf()));
        let flags = ExportFlags {
            endpoint: args.otlp_endpoint.clone(),
            protocol: args.otlp_protocol.clone(),
        };
        let mut export_sources = Vec::new();
        for &(key, var) in EXPORT_KEYS {
            let flag = match key {
                "endpoint" => flags.endpoint.clone().map(|v| (v, "otlp-endpoint")),
                "protocol" => flags.protocol.clone().map(|v| (v, "otlp-protocol")),
                _ => None,
            };
            let resolved = if let Some((value, name)) = flag {
                Some((value, Source::Flag(name)))
            } else if let Some(value) = env(var) {
                Some((value, Source::Env(var)))
            } else {
                f.export.as_env(var).map(|v| (v, file_source.clone()))
            };
            if let Some((value, source)) = resolved {
                if key == "protocol" {
                    Protocol::parse(&value)
                        .map_err(|e| anyhow::anyhow!("export.protocol: {e} (from {source})"))?;
                }
                export_sources.push((key, value, source));
            }
        }
        let lookup = |var: &str| env(var).or_else(|| f.export.as_env(var));
        let mut export = ExportConfig::from_lookup(&flags, lookup).map_err(|e| {
            // The export module's errors name the variable; say which layer set it.
            let culprit = EXPORT_KEYS
                .iter()
                .filter(|(_, var)| e.contains(var))
                .find_map(|(key, _)| export_sources.iter().find(|(k, _, _)| k == key));
            match culprit {
                Some((key, _, source)) => anyhow::anyhow!("export.{key}: {e} (from {source})"),
                None => anyhow::anyhow!("export: {e}"),
            }
        })?;
        // Resource attributes: the file's, under OTEL_RESOURCE_ATTRIBUTES (key by key), under
        // the node name, which the deployment sets per host.
        export.extra_resource = f
            .export
            .resource_attributes
            .unwrap_or_default()
            .into_iter()
            .collect();
        if let Some(node) = &node_name.value {
            export
                .extra_resource
                .push(("k8s.node.name".to_string(), node.clone()));
        }
        Ok(Self {
            netns,
            pids,
            ports,
            untraced,
            layer_spans,
            ring_buffer_mib,
            shutdown_timeout,
            metrics_addr,
            node_name,
            kubernetes_api,
            kubernetes_token_file,
            kubernetes_ca_file,
            kubernetes_server,
            export,
            export_sources,
            config_file: layers.file_path.map(Path::to_path_buf),
        })
    }

    /// Where and how the agent reaches the API server, when `kubernetes.api` is on. Checked
    /// when the agent starts, not by --print-config: the address exists only in a pod.
    fn kubernetes(&self) -> anyhow::Result<Option<kubernetes::ApiConfig>> {
        if !self.kubernetes_api.value {
            return Ok(None);
        }
        let source = &self.kubernetes_api.source;
        let node_name = self.node_name.value.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "kubernetes.api: needs node_name (HOPTRACE_NODE_NAME from the downward API's \
                 spec.nodeName), to watch only this node's pods (from {source})"
            )
        })?;
        let server = self
            .kubernetes_server
            .clone()
            .map_err(|e| anyhow::anyhow!("kubernetes.api: {e} (from {source})"))?;
        Ok(Some(kubernetes::ApiConfig {
            server,
            node_name,
            token_file: self.kubernetes_token_file.value.clone(),
            ca_file: self.kubernetes_ca_file.value.clone(),
        }))
    }

    pub fn agent_options(&self) -> anyhow::Result<AgentOptions> {
        Ok(AgentOptions {
            scope_netns: self.netns.value.clone(),
            scope_pids: self.pids.value.clone(),
            scope_ports: self.ports.value.clone(),
            export: self.export.clone(),
            untraced: self.untraced.value,
            layer_spans: self.layer_spans.value,
            ring_buffer_bytes: self.ring_buffer_mib.value << 20,
            shutdown_timeout: Duration::from_secs_f64(self.shutdown_timeout.value),
            report_interval: Duration::from_secs(10),
            metrics_addr: self.metrics_addr.value,
            kubernetes: self.kubernetes()?,
        })
    }

    /// The batch settings' defaults, as the export module resolved them.
    fn default_number(&self, key: &str) -> Option<u128> {
        let export = &self.export;
        match key {
            "max_queue_size" => Some(export.max_queue_size as u128),
            "max_export_batch_size" => Some(export.max_export_batch_size as u128),
            "schedule_delay_ms" => Some(export.schedule_delay.as_millis()),
            "export_timeout_ms" => Some(export.export_timeout.as_millis()),
            _ => None,
        }
    }

    /// The effective configuration as a config file, each line commented with its layer.
    pub fn render(&self) -> String {
        use toml::Value;
        fn line<T: Into<Value> + Clone>(key: &str, setting: &Setting<T>) -> String {
            format!(
                "{key} = {}  # {}\n",
                setting.value.clone().into(),
                setting.source
            )
        }
        fn optional(key: &str, setting: &Setting<Option<String>>) -> String {
            match &setting.value {
                Some(v) => format!("{key} = {}  # {}\n", Value::from(v.clone()), setting.source),
                None => format!("# {key} unset  # {}\n", setting.source),
            }
        }
        let numbers =
            |values: &[u32]| Value::Array(values.iter().map(|&n| i64::from(n).into()).collect());
        let mut out = String::from(
            "# hoptrace agent: effective configuration (flags > environment > config file > defaults)\n",
        );
        match &self.config_file {
            Some(path) => out += &format!("# config file: {}\n", path.display()),
            None => out += "# config file: none (--config PATH or HOPTRACE_CONFIG)\n",
        }
        out += &line(
            "untraced",
            &Setting {
                value: untraced_name(self.untraced.value),
                source: self.untraced.source.clone(),
            },
        );
        out += &line("layer_spans", &self.layer_spans);
        out += &line(
            "ring_buffer_mib",
            &Setting {
                value: i64::from(self.ring_buffer_mib.value),
                source: self.ring_buffer_mib.source.clone(),
            },
        );
        out += &line("shutdown_timeout", &self.shutdown_timeout);
        out += &optional(
            "metrics_addr",
            &Setting {
                value: self.metrics_addr.value.map(|a| a.to_string()),
                source: self.metrics_addr.source.clone(),
            },
        );
        out += &optional("node_name", &self.node_name);
        out += "\n[kubernetes]\n";
        out += &line("api", &self.kubernetes_api);
        match &self.kubernetes_server {
            Ok(server) => {
                out += &format!("# API server: {server} (KUBERNETES_SERVICE_HOST/PORT)\n")
            }
            Err(e) => out += &format!("# API server: {e}\n"),
        }
        for (key, setting) in [
            ("token_file", &self.kubernetes_token_file),
            ("ca_file", &self.kubernetes_ca_file),
        ] {
            out += &line(
                key,
                &Setting {
                    value: setting.value.display().to_string(),
                    source: setting.source.clone(),
                },
            );
        }
        out += "\n[scope]\n";
        out += &line("netns", &self.netns);
        out += &format!(
            "pids = {}  # {}\n",
            numbers(&self.pids.value),
            self.pids.source
        );
        let ports: Vec<u32> = self.ports.value.iter().map(|&p| u32::from(p)).collect();
        out += &format!("ports = {}  # {}\n", numbers(&ports), self.ports.source);
        out += "\n[export]\n";
        out += &format!("# resolved: {}\n", self.export.describe());
        for &(key, _) in EXPORT_KEYS {
            match self.export_sources.iter().find(|(k, _, _)| *k == key) {
                Some((_, value, source)) => {
                    let value = match key {
                        "disabled" => {
                            boolean(value).map_or_else(|_| Value::from(value.clone()), Value::from)
                        }
                        _ if key.starts_with("max_") || key.ends_with("_ms") => value
                            .trim()
                            .parse::<i64>()
                            .map_or_else(|_| Value::from(value.clone()), Value::from),
                        _ => Value::from(value.clone()),
                    };
                    out += &format!("{key} = {value}  # {source}\n");
                }
                None => match self.default_number(key) {
                    Some(n) => out += &format!("{key} = {n}  # default\n"),
                    None => out += &format!("# {key} unset  # default\n"),
                },
            }
        }
        if !self.export.extra_resource.is_empty() {
            out += "\n[export.resource_attributes]  # under OTEL_RESOURCE_ATTRIBUTES, key by key\n";
            for (key, value) in self.export.extra_resource.iter().filter(|(key, _)| {
                // The node name has its own key above.
                key != "k8s.node.name" || self.node_name.value.is_none()
            }) {
                out += &format!(
                    "{} = {}\n",
                    Value::from(key.clone()),
                    Value::from(value.clone())
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn settings(
        flags: &[&str],
        env: &[(&str, &str)],
        file: Option<&str>,
    ) -> anyhow::Result<Settings> {
        let args = Cli::try_parse_from(std::iter::once("agent").chain(flags.iter().copied()))?.args;
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |key: &str| env.get(key).cloned().filter(|v| !v.trim().is_empty());
        Settings::resolve(
            args,
            &lookup,
            file.map(|text| (Path::new("/etc/hoptrace.toml"), text)),
        )
    }

    const FILE: &str = r#"
        ring_buffer_mib = 16
        shutdown_timeout = 2.5
        untraced = "ignore"
        metrics_addr = "127.0.0.1:9464"
        [scope]
        netns = ["lab-a", "lab-b"]
        pids = [10]
        ports = [80, 443]
        [export]
        endpoint = "http://file:4317"
        protocol = "grpc"
        max_queue_size = 100
        resource_attributes = { "deployment.environment.name" = "lab", "service.name" = "f" }
    "#;

    fn file_source() -> Source {
        Source::File(PathBuf::from("/etc/hoptrace.toml"))
    }

    #[test]
    fn defaults_apply_without_flags_env_or_file() {
        let s = settings(&[], &[], None).unwrap();
        assert_eq!(
            s.ring_buffer_mib,
            Setting {
                value: 4,
                source: Source::Default
            }
        );
        assert_eq!(s.untraced.value, Untraced::NewTrace);
        assert_eq!(s.shutdown_timeout.value, 5.0);
        assert_eq!(s.metrics_addr.value, None);
        assert!(s.netns.value.is_empty() && s.pids.value.is_empty() && s.ports.value.is_empty());
        assert_eq!(s.export.max_queue_size, 2048);
    }

    #[test]
    fn the_file_overrides_defaults() {
        let s = settings(&[], &[], Some(FILE)).unwrap();
        assert_eq!(
            s.ring_buffer_mib,
            Setting {
                value: 16,
                source: file_source()
            }
        );
        assert_eq!(s.untraced.value, Untraced::Ignore);
        assert_eq!(s.netns.value, ["lab-a", "lab-b"]);
        assert_eq!(s.ports.value, [80, 443]);
        assert_eq!(
            s.metrics_addr.value,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(s.export.max_queue_size, 100);
        assert_eq!(
            s.export.target,
            crate::export::Target::Otlp {
                endpoint: "http://file:4317".into(),
                protocol: Protocol::Grpc
            }
        );
        assert!(
            s.export
                .extra_resource
                .contains(&("deployment.environment.name".into(), "lab".into()))
        );
        assert_eq!(
            s.export
                .resource()
                .get(&opentelemetry::Key::from_static_str("service.name"))
                .map(|v| v.to_string())
                .as_deref(),
            Some("f")
        );
    }

    #[test]
    fn the_environment_overrides_the_file_and_flags_override_both() {
        let env = [
            ("HOPTRACE_RING_BUFFER_MIB", "32"),
            ("HOPTRACE_PORTS", "8080, 8443"),
            ("HOPTRACE_NETNS", ""),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "50"),
            ("HOPTRACE_SHUTDOWN_TIMEOUT", "7"),
        ];
        let s = settings(
            &["--ring-buffer-mib", "64", "--port", "9000"],
            &env,
            Some(FILE),
        )
        .unwrap();
        assert_eq!(
            s.ring_buffer_mib,
            Setting {
                value: 64,
                source: Source::Flag("ring-buffer-mib")
            }
        );
        assert_eq!(
            s.ports,
            Setting {
                value: vec![9000],
                source: Source::Flag("port")
            }
        );
        assert_eq!(
            s.shutdown_timeout,
            Setting {
                value: 7.0,
                source: Source::Env("HOPTRACE_SHUTDOWN_TIMEOUT")
            }
        );
        // Empty counts as unset: the file's value stays.
        assert_eq!(
            s.netns,
            Setting {
                value: vec!["lab-a".into(), "lab-b".into()],
                source: file_source()
            }
        );
        assert_eq!(s.pids.source, file_source());
        assert_eq!(s.export.max_queue_size, 50);
        let rendered = s.render();
        assert!(
            rendered.contains("ring_buffer_mib = 64  # flag --ring-buffer-mib"),
            "{rendered}"
        );
        assert!(
            rendered.contains("max_queue_size = 50  # env OTEL_BSP_MAX_QUEUE_SIZE"),
            "{rendered}"
        );
        assert!(
            rendered.contains("endpoint = \"http://env:4317\"  # env OTEL_EXPORTER_OTLP_ENDPOINT"),
            "{rendered}"
        );
        assert!(
            rendered.contains("protocol = \"grpc\"  # file /etc/hoptrace.toml"),
            "{rendered}"
        );
        let flagged = settings(&["--otlp-endpoint", "http://flag:4317"], &env, Some(FILE)).unwrap();
        assert!(
            flagged
                .render()
                .contains("endpoint = \"http://flag:4317\"  # flag --otlp-endpoint")
        );
    }

    #[test]
    fn the_rendered_configuration_is_a_config_file_that_resolves_the_same() {
        let s = settings(
            &["--pid", "3"],
            &[("HOPTRACE_LAYER_SPANS", "true")],
            Some(FILE),
        )
        .unwrap();
        let again = settings(&[], &[], Some(&s.render())).unwrap();
        assert_eq!(again.pids.value, [3]);
        assert!(again.layer_spans.value);
        assert_eq!(again.ring_buffer_mib.value, 16);
        assert_eq!(again.export.target, s.export.target);
        assert_eq!(again.export.max_queue_size, s.export.max_queue_size);
    }

    #[test]
    fn the_kubernetes_lookup_needs_the_node_name_and_the_in_cluster_address() {
        let file = "node_name = \"n1\"\n[kubernetes]\napi = true\nca_file = \"/tmp/ca.pem\"\n";
        let in_cluster = [
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("HOPTRACE_KUBERNETES_TOKEN_FILE", "/tmp/token"),
        ];
        let s = settings(&[], &in_cluster, Some(file)).unwrap();
        let api = s.agent_options().unwrap().kubernetes.unwrap();
        assert_eq!(
            api,
            kubernetes::ApiConfig {
                server: "https://10.96.0.1:443".into(),
                node_name: "n1".into(),
                token_file: "/tmp/token".into(),
                ca_file: "/tmp/ca.pem".into(),
            }
        );
        let rendered = s.render();
        assert!(
            rendered.contains("api = true  # file /etc/hoptrace.toml")
                && rendered.contains("# API server: https://10.96.0.1:443")
                && rendered
                    .contains("token_file = \"/tmp/token\"  # env HOPTRACE_KUBERNETES_TOKEN_FILE"),
            "{rendered}"
        );
        let again = settings(&[], &in_cluster, Some(&rendered)).unwrap();
        assert_eq!(again.agent_options().unwrap().kubernetes.unwrap(), api);
        // Off by default, and off by flag over the file.
        let off = settings(&["--kubernetes-api=false"], &in_cluster, Some(file)).unwrap();
        assert!(off.agent_options().unwrap().kubernetes.is_none());
        assert!(
            settings(&[], &in_cluster, None)
                .unwrap()
                .agent_options()
                .unwrap()
                .kubernetes
                .is_none()
        );
        // --print-config works outside a pod; starting does not.
        let outside = settings(&[], &[], Some(file)).unwrap();
        assert!(
            outside
                .render()
                .contains("# API server: KUBERNETES_SERVICE_HOST")
        );
        let error = format!("{:#}", outside.agent_options().err().unwrap());
        assert!(
            error.starts_with("kubernetes.api: KUBERNETES_SERVICE_HOST")
                && error.ends_with("(from file /etc/hoptrace.toml)"),
            "{error}"
        );
        let error = settings(&["--kubernetes-api"], &in_cluster, None)
            .unwrap()
            .agent_options()
            .err()
            .unwrap();
        assert!(
            format!("{error:#}").contains("needs node_name")
                && format!("{error:#}").ends_with("(from flag --kubernetes-api)"),
            "{error:#}"
        );
        let error = format!(
            "{:#}",
            settings(&[], &[("HOPTRACE_KUBERNETES_API", "sure")], None).unwrap_err()
        );
        assert!(error.starts_with("kubernetes.api:"), "{error}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_where_it_came_from() {
        let error = |flags: &[&str], env: &[(&str, &str)], file: Option<&str>| {
            format!("{:#}", settings(flags, env, file).unwrap_err())
        };
        let unknown = error(&[], &[], Some("[scope]\nnetnss = [\"x\"]"));
        assert!(
            unknown.contains("/etc/hoptrace.toml") && unknown.contains("unknown field `netnss`"),
            "{unknown}"
        );
        let unknown = error(&[], &[], Some("[exporter]\nendpoint = \"x\""));
        assert!(unknown.contains("unknown field `exporter`"), "{unknown}");
        let typed = error(&[], &[], Some("ring_buffer_mib = \"big\""));
        assert!(
            typed.contains("ring_buffer_mib") && typed.contains("expected u32"),
            "{typed}"
        );
        let file_range = error(&[], &[], Some("ring_buffer_mib = 3"));
        assert_eq!(
            file_range,
            "ring_buffer_mib: 3 is not a power of two from 1 to 1024 (MiB) (from file /etc/hoptrace.toml)"
        );
        let env_range = error(&[], &[("HOPTRACE_RING_BUFFER_MIB", "2048")], None);
        assert!(
            env_range.ends_with("(from env HOPTRACE_RING_BUFFER_MIB)"),
            "{env_range}"
        );
        let flag_range = error(&["--ring-buffer-mib", "6"], &[], None);
        assert!(
            flag_range.ends_with("(from flag --ring-buffer-mib)"),
            "{flag_range}"
        );
        let port = error(&[], &[("HOPTRACE_PORTS", "80,http")], None);
        assert!(
            port.starts_with("scope.ports: HOPTRACE_PORTS=\"80,http\"")
                && port.contains("\"http\""),
            "{port}"
        );
        let untraced = error(&[], &[], Some("untraced = \"drop\""));
        assert!(
            untraced.starts_with("untraced:") && untraced.contains("(from file"),
            "{untraced}"
        );
        let layer = error(&[], &[("HOPTRACE_LAYER_SPANS", "maybe")], None);
        assert!(
            layer.contains("HOPTRACE_LAYER_SPANS") && layer.contains("not a boolean"),
            "{layer}"
        );
        let protocol = error(&[], &[], Some("[export]\nprotocol = \"udp\""));
        assert!(
            protocol.starts_with("export.protocol: unknown OTLP protocol")
                && protocol.ends_with("(from file /etc/hoptrace.toml)"),
            "{protocol}"
        );
        let exporter = error(&[], &[("OTEL_TRACES_EXPORTER", "zipkin")], None);
        assert!(
            exporter.starts_with("export.exporter:")
                && exporter.ends_with("(from env OTEL_TRACES_EXPORTER)"),
            "{exporter}"
        );
        let shutdown = error(&[], &[("HOPTRACE_SHUTDOWN_TIMEOUT", "-1")], None);
        assert!(
            shutdown.contains("shutdown_timeout") && shutdown.contains("from env"),
            "{shutdown}"
        );
        let addr = error(&[], &[], Some("metrics_addr = \"9464\""));
        assert!(
            addr.starts_with("metrics_addr: \"9464\"") && addr.contains("(from file"),
            "{addr}"
        );
    }
}
