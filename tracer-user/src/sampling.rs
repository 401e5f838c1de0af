//! Which requests become spans: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG as the OpenTelemetry
//! SDK configuration spec defines them, and what to do with requests that carry no trace context.

/// OTEL_TRACES_SAMPLER values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Keep a trace when its id falls under the ratio (deterministic per trace id, so every
    /// host's agent decides the same for the same trace).
    TraceIdRatio(f64),
    /// Respect the parent's sampled flag; for new traces, use the root sampler.
    ParentBased(Root),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

impl Default for Sampler {
    /// The spec's default: parentbased_always_on.
    fn default() -> Self {
        Self::ParentBased(Root::AlwaysOn)
    }
}

impl Sampler {
    pub fn from_env(name: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg {
                None => Ok(1.0),
                Some(a) => match a.trim().parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(format!(
                        "OTEL_TRACES_SAMPLER_ARG={a:?} is not a ratio in [0, 1]"
                    )),
                },
            }
        };
        Ok(match name.map(str::trim) {
            None | Some("parentbased_always_on") => Self::ParentBased(Root::AlwaysOn),
            Some("always_on") => Self::AlwaysOn,
            Some("always_off") => Self::AlwaysOff,
            Some("traceidratio") => Self::TraceIdRatio(ratio()?),
            Some("parentbased_always_off") => Self::ParentBased(Root::AlwaysOff),
            Some("parentbased_traceidratio") => Self::ParentBased(Root::TraceIdRatio(ratio()?)),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not supported: use always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off or \
                     parentbased_traceidratio"
                ));
            }
        })
    }

    /// `parent_sampled` is the traceparent's flag, `None` for a trace hoptrace starts.
    pub fn keep(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        match (self, parent_sampled) {
            (Self::AlwaysOn, _) => true,
            (Self::AlwaysOff, _) => false,
            (Self::TraceIdRatio(r), _) => ratio_keeps(*r, trace_id),
            (Self::ParentBased(_), Some(sampled)) => sampled,
            (Self::ParentBased(Root::AlwaysOn), None) => true,
            (Self::ParentBased(Root::AlwaysOff), None) => false,
            (Self::ParentBased(Root::TraceIdRatio(r)), None) => ratio_keeps(*r, trace_id),
        }
    }
}

/// The W3C Level 2 / OTel rule: compare the trace id's last 56 bits (its random part) with the
/// ratio's threshold.
fn ratio_keeps(ratio: f64, trace_id: &[u8; 16]) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let mut low = [0u8; 8];
    low[1..].copy_from_slice(&trace_id[9..16]);
    // Integer comparison: 2^56 - 1 as f64 would round up to 2^56.
    let threshold = (ratio * (1u64 << 56) as f64) as u64;
    u64::from_be_bytes(low) < threshold
}

/// What to do with a request that carries no (valid) traceparent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Untraced {
    /// No span (counted).
    Ignore,
    /// Start a new trace, marked `hoptrace.trace_origin = "hoptrace"`.
    NewTrace,
}

impl Untraced {
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            "ignore" => Ok(Self::Ignore),
            "new-trace" => Ok(Self::NewTrace),
            other => Err(format!(
                "untraced requests: {other:?} is not ignore or new-trace"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_names() {
        assert_eq!(
            Sampler::from_env(None, None).unwrap(),
            Sampler::ParentBased(Root::AlwaysOn)
        );
        assert_eq!(
            Sampler::from_env(Some("parentbased_traceidratio"), Some("0.25")).unwrap(),
            Sampler::ParentBased(Root::TraceIdRatio(0.25))
        );
        assert!(Sampler::from_env(Some("traceidratio"), Some("2")).is_err());
        assert!(Sampler::from_env(Some("jaeger_remote"), None).is_err());
    }

    #[test]
    fn parent_based_respects_the_sampled_flag() {
        let sampler = Sampler::default();
        assert!(sampler.keep(&[1; 16], Some(true)));
        assert!(!sampler.keep(&[1; 16], Some(false)));
        assert!(sampler.keep(&[1; 16], None));
    }

    #[test]
    fn ratio_keeps_about_that_share_of_random_trace_ids() {
        let sampler = Sampler::ParentBased(Root::TraceIdRatio(0.25));
        let kept = (0..20_000)
            .filter(|_| sampler.keep(&rand::random(), None))
            .count();
        assert!((4_000..6_000).contains(&kept), "{kept}");
        assert!(!Sampler::TraceIdRatio(0.0).keep(&[0; 16], None));
        assert!(Sampler::TraceIdRatio(1.0).keep(&[0xff; 16], None));
    }
}
