//! Container metadata end to end: a real server process placed in a cgroup shaped like a
//! Kubernetes container's (cgroup v2, systemd driver, containerd) gets `container.id` and
//! `k8s.pod.uid` on its spans; a host process gets neither; the node name from the downward-API
//! variable is a resource attribute of every span.

use std::time::Duration;

use hoptrace_tests::{
    agent::Agent,
    cgroup::{PodServer, curl_retrying},
    receiver::OtlpReceiver,
};
use xtask::lab::{Host, Lab, LabConfig, PERSONA_IP, PYTHON_PORT};

const CONTAINER_ID: &str = "9c3e1f0a7b2d4c6e8f1a3b5c7d9e0f2a4b6c8d0e1f3a5b7c9d1e3f5a7b9c1d3e";
const POD_UID: &str = "6b1f2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
#[test]
fn spans_of_a_containerized_server_carry_its_container_id_and_pod_uid() {
    let lab = Lab::start(LabConfig::default()).expect("lab");
    let receiver = OtlpReceiver::start().expect("receiver");
    let port = PYTHON_PORT + 1;
    let pod = PodServer::start(&lab, "metadata", POD_UID, CONTAINER_ID, port);
    let server = &pod.server;
    let endpoint = receiver.grpc_endpoint();
    let _agent = Agent::start(
        &["--netns", lab.netns(Host::Persona).name()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("HOPTRACE_NODE_NAME", "lab-node-1"),
        ],
    )
    .expect("agent");
    curl_retrying(&lab, &format!("http://{PERSONA_IP}:{port}/"));
    curl_retrying(&lab, &lab.nginx_url("/"));
    let persona_request = |spans: &[hoptrace_tests::receiver::ReceivedSpan], server_port: i64| {
        spans
            .iter()
            .find(|s| {
                s.attr_str("hoptrace.hop") == Some("persona")
                    && s.attr_str("http.request.method").is_some()
                    && s.attr_i64("server.port") == Some(server_port)
            })
            .cloned()
    };
    let spans = receiver
        .try_wait_for_spans(
            |spans| {
                persona_request(spans, port.into()).is_some()
                    && persona_request(spans, 80).is_some()
            },
            Duration::from_secs(20),
        )
        .expect("persona request spans of both servers");
    let contained = persona_request(&spans, port.into()).unwrap();
    assert_eq!(
        contained.attr_i64("process.pid"),
        Some(i64::from(server.pid()))
    );
    assert_eq!(
        contained.attr_str("container.id"),
        Some(CONTAINER_ID),
        "{contained:#?}"
    );
    assert_eq!(
        contained.attr_str("k8s.pod.uid"),
        Some(POD_UID),
        "{contained:#?}"
    );
    let host = persona_request(&spans, 80).unwrap();
    assert_eq!(host.attr_str("container.id"), None, "{host:#?}");
    assert_eq!(host.attr_str("k8s.pod.uid"), None, "{host:#?}");
    for span in [&contained, &host] {
        assert_eq!(span.resource_str("k8s.node.name"), Some("lab-node-1"));
    }
}
