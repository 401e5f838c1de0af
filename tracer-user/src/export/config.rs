//! Export configuration from the OpenTelemetry environment variables (the names and defaults of
//! the OTel SDK configuration spec) with command-line flags taking precedence.

use std::time::Duration;

use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::{
    Resource,
    resource::{EnvResourceDetector, ResourceDetector as _, TelemetryResourceDetector},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

impl Protocol {
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "http/json" => Ok(Self::HttpJson),
            other => Err(format!(
                "unknown OTLP protocol {other:?}: use grpc, http/protobuf or http/json"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
            Self::HttpJson => "http/json",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// No endpoint configured: print to the terminal (the embedded default).
    Terminal,
    Otlp {
        endpoint: String,
        protocol: Protocol,
    },
    /// OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none: why.
    Disabled(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    pub target: Target,
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    pub schedule_delay: Duration,
    pub export_timeout: Duration,
    /// OTEL_EXPORTER_OTLP_[TRACES_]HEADERS: `key=value,...` sent with every export.
    pub headers: Option<String>,
    /// OTEL_SERVICE_NAME (or its config-file key).
    pub service_name: Option<String>,
    /// Resource attributes below OTEL_RESOURCE_ATTRIBUTES (config file, node name): the
    /// variable's attributes win key by key.
    pub extra_resource: Vec<(String, String)>,
}

/// Flags that override the environment.
#[derive(Clone, Debug, Default)]
pub struct ExportFlags {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
}

impl ExportConfig {
    /// From the process environment alone (the correlator's; the agent's settings layer a
    /// config file under it). An empty variable counts as unset.
    pub fn from_env(flags: &ExportFlags) -> Result<Self, String> {
        Self::from_lookup(flags, |key| {
            std::env::var(key).ok().filter(|v| !v.trim().is_empty())
        })
    }

    /// `lookup` reads one variable; separate from the process environment for tests.
    pub fn from_lookup(
        flags: &ExportFlags,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let protocol = match flags.protocol.clone().or_else(|| {
            lookup("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|| lookup("OTEL_EXPORTER_OTLP_PROTOCOL"))
        }) {
            Some(p) => Protocol::parse(&p)?,
            // The spec's default.
            None => Protocol::HttpProtobuf,
        };
        // The signal-specific variable is the full URL; the generic one is a base to which HTTP
        // appends /v1/traces (OTLP exporter spec, "Endpoint URLs for OTLP/HTTP").
        let endpoint = match (
            &flags.endpoint,
            lookup("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ) {
            (Some(base), _) => Some(base_to_traces_url(base, protocol)),
            (None, Some(full)) => Some(full),
            (None, None) => {
                lookup("OTEL_EXPORTER_OTLP_ENDPOINT").map(|b| base_to_traces_url(&b, protocol))
            }
        };
        let exporter = lookup("OTEL_TRACES_EXPORTER");
        let target = if lookup("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        {
            Target::Disabled("OTEL_SDK_DISABLED=true")
        } else {
            match exporter.as_deref().map(str::trim) {
                Some("none") => Target::Disabled("OTEL_TRACES_EXPORTER=none"),
                Some("console") => Target::Terminal,
                Some("otlp") | None => match endpoint {
                    Some(endpoint) => Target::Otlp { endpoint, protocol },
                    None if exporter.is_some() => Target::Otlp {
                        endpoint: base_to_traces_url(default_endpoint(protocol), protocol),
                        protocol,
                    },
                    None => Target::Terminal,
                },
                Some(other) => {
                    return Err(format!(
                        "OTEL_TRACES_EXPORTER={other:?} is not supported: use otlp, console or none"
                    ));
                }
            }
        };
        let number = |key: &str, default: u64| -> Result<u64, String> {
            lookup(key).map_or(Ok(default), |v| {
                v.trim()
                    .parse()
                    .map_err(|_| format!("{key}={v:?} is not a whole number"))
            })
        };
        let max_queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?.max(1) as usize;
        Ok(Self {
            target,
            max_queue_size,
            max_export_batch_size: (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?.max(1) as usize)
                .min(max_queue_size),
            schedule_delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)?.max(1)),
            export_timeout: Duration::from_millis(number("OTEL_BSP_EXPORT_TIMEOUT", 30000)?.max(1)),
            headers: lookup("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
                .or_else(|| lookup("OTEL_EXPORTER_OTLP_HEADERS")),
            service_name: lookup("OTEL_SERVICE_NAME"),
            extra_resource: Vec::new(),
        })
    }

    /// Where spans go, in one line.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Terminal => "terminal (no OTLP endpoint)".to_string(),
            Target::Otlp { endpoint, protocol } => {
                format!("OTLP {} to {endpoint}", protocol.as_str())
            }
            Target::Disabled(why) => format!("disabled ({why})"),
        }
    }

    /// The resource: `extra_resource`, then OTEL_RESOURCE_ATTRIBUTES over it (as the SDK reads
    /// it), and the service name from OTEL_SERVICE_NAME, else `service.name` among the
    /// attributes, else `hoptrace`.
    pub fn resource(&self) -> Resource {
        let from_env = EnvResourceDetector::new().detect();
        let service_name = self
            .service_name
            .clone()
            .or_else(|| {
                from_env
                    .get(&Key::from_static_str("service.name"))
                    .map(|v| v.to_string())
            })
            .or_else(|| {
                self.extra_resource
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| "hoptrace".to_string());
        Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_attributes(
                self.extra_resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_attributes(
                from_env
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_service_name(service_name)
            .build()
    }
}

fn default_endpoint(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Grpc => "http://localhost:4317",
        _ => "http://localhost:4318",
    }
}

fn base_to_traces_url(base: &str, protocol: Protocol) -> String {
    match protocol {
        Protocol::Grpc => base.to_string(),
        _ if base.trim_end_matches('/').ends_with("/v1/traces") => base.to_string(),
        _ => format!("{}/v1/traces", base.trim_end_matches('/')),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(flags: ExportFlags, env: &[(&str, &str)]) -> Result<ExportConfig, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ExportConfig::from_lookup(&flags, |k| env.get(k).cloned())
    }

    #[test]
    fn no_endpoint_prints_to_the_terminal() {
        assert_eq!(
            config(ExportFlags::default(), &[]).unwrap().target,
            Target::Terminal
        );
    }

    #[test]
    fn endpoints_follow_the_otlp_exporter_spec() {
        let grpc = config(
            ExportFlags::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
        )
        .unwrap();
        assert_eq!(
            grpc.target,
            Target::Otlp {
                endpoint: "http://c:4317".into(),
                protocol: Protocol::Grpc
            }
        );
        let http = config(
            ExportFlags::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")],
        )
        .unwrap();
        assert_eq!(
            http.target,
            Target::Otlp {
                endpoint: "http://c:4318/v1/traces".into(),
                protocol: Protocol::HttpProtobuf
            }
        );
        let full = config(
            ExportFlags::default(),
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:9/custom"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"),
            ],
        )
        .unwrap();
        assert_eq!(
            full.target,
            Target::Otlp {
                endpoint: "http://c:9/custom".into(),
                protocol: Protocol::HttpProtobuf
            }
        );
    }

    #[test]
    fn flags_override_the_environment() {
        let flags = ExportFlags {
            endpoint: Some("http://f:4317".into()),
            protocol: Some("grpc".into()),
        };
        let cfg = config(
            flags,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://e:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ],
        )
        .unwrap();
        assert_eq!(
            cfg.target,
            Target::Otlp {
                endpoint: "http://f:4317".into(),
                protocol: Protocol::Grpc
            }
        );
    }

    #[test]
    fn disabled_and_bad_values_are_explicit() {
        let disabled = config(
            ExportFlags::default(),
            &[
                ("OTEL_SDK_DISABLED", "true"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ],
        )
        .unwrap();
        assert_eq!(disabled.target, Target::Disabled("OTEL_SDK_DISABLED=true"));
        assert!(
            config(
                ExportFlags::default(),
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "udp")]
            )
            .unwrap_err()
            .contains("unknown OTLP protocol")
        );
        assert!(
            config(
                ExportFlags::default(),
                &[("OTEL_BSP_MAX_QUEUE_SIZE", "lots")]
            )
            .unwrap_err()
            .contains("OTEL_BSP_MAX_QUEUE_SIZE")
        );
        assert!(
            config(
                ExportFlags::default(),
                &[("OTEL_TRACES_EXPORTER", "zipkin")]
            )
            .is_err()
        );
    }

    #[test]
    fn batch_settings_come_from_the_bsp_variables() {
        let cfg = config(
            ExportFlags::default(),
            &[
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.schedule_delay, Duration::from_millis(200));
        assert_eq!((cfg.max_queue_size, cfg.max_export_batch_size), (100, 100));
    }
}
