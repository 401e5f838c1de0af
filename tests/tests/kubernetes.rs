//! Pod names from the Kubernetes API server, end to end: the real agent traces a real server
//! process placed in a cgroup shaped like a kubelet pod's, looks its pod up in an API server,
//! and the spans at the real OTLP receiver carry k8s.pod.name, k8s.namespace.name and
//! k8s.container.name; faults of the API server are logged and counted while spans flow.
//!
//! The API server is a stand-in (tests/kube_apiserver.py: HTTPS, bearer tokens, PodList and
//! watch streams in the real API's shape): no kube-apiserver can run on the test machines.

use std::time::{Duration, Instant};

use hoptrace_tests::{
    agent::Agent,
    cgroup::{PodServer, curl_retrying},
    kube_api::{KubeApi, PodSpec},
    prometheus::scrape,
    receiver::{OtlpReceiver, ReceivedSpan},
};
use serde_json::{Value, json};
use xtask::lab::{Host, Lab, LabConfig, PERSONA_IP, PYTHON_PORT};

const NODE: &str = "lab-node-1";
const NAMESPACE: &str = "shop";

/// One test's pod: the cgroup its server runs in and what the API server says about it.
struct Pod {
    uid: &'static str,
    name: &'static str,
    /// Its one container: name and id.
    container: (&'static str, &'static str),
}

impl Pod {
    fn spec(&self) -> PodSpec<'_> {
        PodSpec {
            uid: self.uid,
            name: self.name,
            namespace: NAMESPACE,
            node: NODE,
            containers: std::slice::from_ref(&self.container),
        }
    }
}

/// The lab, a receiver, and a python HTTP server on `port` in the persona inside the pod's
/// cgroup.
struct Setup {
    lab: Lab,
    receiver: OtlpReceiver,
    _server: PodServer,
    port: u16,
}

impl Setup {
    fn start(name: &str, pod: &Pod, port: u16) -> Self {
        let lab = Lab::start(LabConfig::default()).expect("lab");
        let receiver = OtlpReceiver::start().expect("receiver");
        let server = PodServer::start(&lab, name, pod.uid, pod.container.1, port);
        Self {
            lab,
            receiver,
            _server: server,
            port,
        }
    }

    fn agent(&self, api_env: &[(String, String)]) -> Agent {
        let endpoint = self.receiver.grpc_endpoint();
        let mut env: Vec<(&str, &str)> = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ];
        env.extend(api_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Agent::start(
            &[
                "--netns",
                self.lab.netns(Host::Persona).name(),
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &env,
        )
        .expect("agent")
    }

    /// One request to the pod's server; returns its persona span as the receiver got it.
    fn request(&self, path: &str) -> ReceivedSpan {
        let url = format!("http://{PERSONA_IP}:{}/{path}", self.port);
        curl_retrying(&self.lab, &url);
        let target = format!("/{path}");
        let find = |spans: &[ReceivedSpan]| {
            spans
                .iter()
                .find(|s| {
                    s.attr_str("hoptrace.hop") == Some("persona")
                        && s.attr_str("url.path") == Some(target.as_str())
                })
                .cloned()
        };
        let spans = self
            .receiver
            .try_wait_for_spans(|spans| find(spans).is_some(), Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("no persona span of {url}: {e}"));
        find(&spans).unwrap()
    }
}

/// The value of a metric at the agent's /metrics (0 when absent).
fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    let url = agent.metrics_url().expect("metrics url");
    scrape(&url).value(name, labels).unwrap_or(0.0)
}

/// Waits until the metric reaches `at_least` (the agent publishes every 500 ms).
fn wait_metric(agent: &Agent, name: &str, labels: &[(&str, &str)], at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = metric(agent, name, labels);
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} = {value}, expected >= {at_least}\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_list(r: &Value) -> bool {
    r["status"] == 200 && r["watch"] == false && r.get("malformed").is_none()
}

fn is_watch(r: &Value) -> bool {
    r["status"] == 200 && r["watch"] == true
}

fn assert_named(span: &ReceivedSpan, pod: &Pod) {
    assert_eq!(span.attr_str("k8s.pod.name"), Some(pod.name), "{span:#?}");
    assert_eq!(span.attr_str("k8s.namespace.name"), Some(NAMESPACE));
    assert_eq!(span.attr_str("k8s.container.name"), Some(pod.container.0));
    assert_eq!(span.attr_str("k8s.pod.uid"), Some(pod.uid));
    assert_eq!(span.attr_str("container.id"), Some(pod.container.1));
    assert_eq!(span.resource_str("k8s.node.name"), Some(NODE));
}

fn assert_unnamed(span: &ReceivedSpan, pod: &Pod) {
    assert_eq!(span.attr_str("k8s.pod.name"), None, "{span:#?}");
    assert_eq!(span.attr_str("k8s.namespace.name"), None);
    // What the cgroup says is there regardless of the API server.
    assert_eq!(span.attr_str("k8s.pod.uid"), Some(pod.uid));
    assert_eq!(span.attr_str("container.id"), Some(pod.container.1));
}

#[test]
fn spans_of_a_pod_carry_its_name_namespace_and_container_from_the_api_server() {
    let pod = Pod {
        uid: "2a7c4e91-3b5d-4f60-8a1b-9c2d3e4f5a6b",
        name: "web-7d4b9c-x2k4q",
        container: (
            "http",
            "5e8a0c2f4b6d8e0a1c3e5f7a9b1d3f5e7a9c1e3b5d7f9a1c3e5b7d9f1a3c5e7b",
        ),
    };
    let mut api = KubeApi::start("names", "token-1").expect("stand-in API server");
    // A pod of another node: the agent never asks for it.
    api.add_pod(&PodSpec {
        uid: "7f6e5d4c-3b2a-4190-8f7e-6d5c4b3a2918",
        name: "db-0",
        namespace: NAMESPACE,
        node: "lab-node-2",
        containers: &[("db", &"d".repeat(64))],
    })
    .unwrap();
    let setup = Setup::start("k8s-names", &pod, PYTHON_PORT + 2);
    let agent = setup.agent(&api.agent_env(NODE));

    // LIST then WATCH from the list's version, with the token, for this node only.
    let requests = api
        .wait_for_requests(1, is_watch, Duration::from_secs(20))
        .unwrap();
    let list = requests.iter().find(|r| is_list(r)).expect("a LIST");
    assert_eq!(list["query"]["fieldSelector"], "spec.nodeName=lab-node-1");
    assert_eq!(list["token"], "token-1");
    let watch = requests.iter().find(|r| is_watch(r)).unwrap();
    assert_eq!(watch["query"]["resourceVersion"], list["resourceVersion"]);
    assert_eq!(watch["query"]["fieldSelector"], "spec.nodeName=lab-node-1");
    assert_eq!(watch["query"]["allowWatchBookmarks"], "true");

    // The pod is not known yet: its span goes out without a name, counted.
    let early = setup.request("before");
    assert_unnamed(&early, &pod);
    wait_metric(
        &agent,
        "hoptrace_kubernetes_spans_pod_unknown_total",
        &[],
        1.0,
    );

    // It starts: an ADDED event on the open watch names its spans from then on.
    api.add_pod(&pod.spec()).unwrap();
    wait_metric(&agent, "hoptrace_kubernetes_pods", &[], 1.0);
    assert_named(&setup.request("after-added"), &pod);
    wait_metric(&agent, "hoptrace_kubernetes_spans_named_total", &[], 1.0);

    // The kubelet rotates the token and the server's history is compacted: the watch ends
    // with 410 Expired, the agent lists again (with the new token) and watches from there.
    api.write_token("token-2").unwrap();
    api.accept_token("token-2").unwrap();
    let before = api.requests().len();
    api.expire().unwrap();
    let requests = api
        .wait_for_requests(
            1,
            |r| is_watch(r) && r["token"] == "token-2",
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let after: Vec<&Value> = requests[before..].iter().collect();
    assert!(
        after.iter().all(|r| r["status"] == 200),
        "a request with a stale token: {after:#?}"
    );
    let relist = after.iter().find(|r| is_list(r)).expect("a LIST after 410");
    assert_eq!(relist["token"], "token-2");
    let rewatch = after.iter().find(|r| is_watch(r)).unwrap();
    assert_eq!(
        rewatch["query"]["resourceVersion"],
        relist["resourceVersion"]
    );
    assert!(agent.stderr().contains("410 Gone"), "{}", agent.stderr());
    assert_named(&setup.request("after-relist"), &pod);

    // It is deleted: the directory forgets it.
    api.delete_pod(pod.uid).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&agent, "hoptrace_kubernetes_pods", &[]) != 0.0 {
        assert!(Instant::now() < deadline, "the DELETED pod is still known");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_unnamed(&setup.request("after-deleted"), &pod);
    assert_eq!(
        metric(&agent, "hoptrace_kubernetes_api_errors_total", &[]),
        0.0,
        "{}",
        agent.stderr()
    );
}

#[test]
fn api_server_faults_are_logged_and_counted_and_spans_still_flow() {
    let pod = Pod {
        uid: "3b8d5fa2-4c6e-4071-9b2c-0d3e4f5a6b7c",
        name: "shop-api-5f6g7-abcde",
        container: (
            "api",
            "6f9b1d3a5c7e9f1b2d4f6a8b0c2e4a6f8b0d2f4c6e8a0b2d4f6c8e0a2b4d6f8c",
        ),
    };
    let mut api = KubeApi::start("faults", "right").expect("stand-in API server");
    api.add_pod(&pod.spec()).unwrap();
    // The agent's token is one the server does not accept.
    api.write_token("wrong").unwrap();
    let setup = Setup::start("k8s-faults", &pod, PYTHON_PORT + 3);
    let agent = setup.agent(&api.agent_env(NODE));

    // 401 on every try: logged, counted, retried; spans are exported without names.
    api.wait_for_requests(2, |r| r["status"] == 401, Duration::from_secs(20))
        .unwrap();
    assert_unnamed(&setup.request("rejected"), &pod);
    wait_metric(
        &agent,
        "hoptrace_kubernetes_api_errors_total",
        &[("reason", "unauthorized")],
        2.0,
    );
    assert!(
        agent.stderr().contains("401 Unauthorized"),
        "{}",
        agent.stderr()
    );

    // The token is fixed, then the service account lacks its role (403), then a response
    // is cut short (malformed JSON); the agent gets through after each.
    api.fail_next(json!([403, "malformed"])).unwrap();
    api.write_token("right").unwrap();
    api.wait_for_requests(1, is_watch, Duration::from_secs(40))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_named(&setup.request("recovered"), &pod);
    for reason in ["unauthorized", "forbidden", "malformed"] {
        wait_metric(
            &agent,
            "hoptrace_kubernetes_api_errors_total",
            &[("reason", reason)],
            1.0,
        );
    }
    let log = agent.stderr();
    assert!(
        log.contains("403 Forbidden") && log.contains("ClusterRole hoptrace-agent"),
        "{log}"
    );
    assert!(log.contains("malformed response: pod list"), "{log}");

    // Retries back off: consecutive failed requests are at least 0.5 s, 1 s, 2 s ... apart
    // (noise only adds time; jitter only adds too).
    let requests = api.requests();
    let failed: Vec<f64> = requests
        .iter()
        .take_while(|r| !is_list(r))
        .map(|r| r["time"].as_f64().unwrap())
        .collect();
    assert!(failed.len() >= 3, "{requests:#?}");
    for (i, pair) in failed.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let floor = (0.5 * 2f64.powi(i as i32)).min(30.0);
        assert!(
            gap >= floor * 0.99,
            "retry {i} after {gap:.3} s, < {floor} s"
        );
    }
}

#[test]
fn an_unreachable_api_server_is_counted_and_spans_still_flow() {
    let pod = Pod {
        uid: "4c9e6ab3-5d7f-4182-8c3d-1e4f5a6b7c8d",
        name: "cart-0",
        container: (
            "cart",
            "7a0c2e4b6d8f0a2c3e5a7b9c1d3f5b7a9c1e3d5f7b9d1a3c5e7f9b1d3a5c7e9d",
        ),
    };
    // A port nothing listens on, and a CA the agent can read.
    let api = KubeApi::start("unreachable", "t").expect("stand-in API server");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut env = api.agent_env(NODE);
    for (key, value) in &mut env {
        if key == "KUBERNETES_SERVICE_PORT" {
            *value = closed_port.to_string();
        }
    }
    let setup = Setup::start("k8s-unreachable", &pod, PYTHON_PORT + 4);
    let agent = setup.agent(&env);
    assert_unnamed(&setup.request("unreachable"), &pod);
    wait_metric(
        &agent,
        "hoptrace_kubernetes_api_errors_total",
        &[("reason", "unreachable")],
        1.0,
    );
    let log = agent.stderr();
    assert!(
        log.contains("API server unreachable") && log.contains("onnection refused"),
        "{log}"
    );
}
