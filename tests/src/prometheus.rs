//! Scrapes the agent's /metrics with the reference parsers (prometheus_client's Prometheus text
//! and OpenMetrics parsers, Python).

use std::{collections::BTreeMap, process::Command};

use serde::Deserialize;

/// Parses a scrape with both of prometheus_client's parsers (the OpenMetrics one is strict: it
/// needs `# EOF`, valid types and suffixes) and prints the samples as JSON.
const SCRAPER: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
    content_type = response.headers.get("Content-Type")
    text = response.read().decode()
strict = {s.name: s.value for f in openmetrics(text) for s in f.samples if not s.labels}
samples = [{"name": s.name, "labels": s.labels, "value": s.value, "type": f.type}
           for f in text_string_to_metric_families(text) for s in f.samples]
json.dump({"content_type": content_type, "samples": samples, "strict_unlabeled": len(strict)}, sys.stdout)
"#;

#[derive(Deserialize)]
pub struct Scrape {
    pub content_type: String,
    pub samples: Vec<Sample>,
    /// Unlabeled samples the strict OpenMetrics parser read.
    pub strict_unlabeled: usize,
}

#[derive(Deserialize, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    #[serde(rename = "type")]
    pub kind: String,
}

/// GETs `url` and parses it; panics when either parser refuses it.
pub fn scrape(url: &str) -> Scrape {
    let out = Command::new("python3")
        .args(["-c", SCRAPER, url])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("scraper output")
}

impl Scrape {
    /// The first sample of that name whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }
}
