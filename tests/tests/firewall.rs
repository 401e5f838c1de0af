//! End-to-end firewall attribution on one host: one agent watching the agent and persona
//! namespaces (not the fw, which stays uninstrumented) joins both sides of each request by its
//! traceparent and exports the firewall's forward and return time, through a plain L3
//! forwarder, through haproxy terminating TCP in the fw, and through haproxy intercepting TLS.

use hoptrace_tests::{
    agent::Agent,
    firewall::{
        REQUESTS, check_intercepted, check_split, curl_requests, intercepted_requests, lab,
        set_delays, spans_of, start_haproxy, start_interception,
    },
    receiver::OtlpReceiver,
};
use xtask::lab::Lab;

fn start(lab: &Lab, receiver: &OtlpReceiver) -> Agent {
    Agent::watching_lab(lab, receiver).expect("agent")
}

#[test]
fn an_l3_forwarder_gets_forward_and_return_spans_that_add_up() {
    let lab = lab();
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = start(&lab, &receiver);
    set_delays(&lab, 20, 10);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    curl_requests(&lab, &lab.nginx_url("/"), trace);
    check_split(
        &spans_of(&receiver, trace, REQUESTS),
        REQUESTS,
        (20, 10),
        "forwarder",
    );
}

#[test]
fn a_tcp_terminating_proxy_is_attributed_by_trace_context() {
    let lab = lab();
    let (_haproxy, url) = start_haproxy(&lab);
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = start(&lab, &receiver);
    set_delays(&lab, 15, 5);
    let trace = "1af7651916cd43dd8448eb211c80319c";
    curl_requests(&lab, &url, trace);
    // haproxy's own leg to the persona is new per request or reused: either way the join is by
    // trace context, and the split is on the agent's and the persona's NICs.
    check_split(
        &spans_of(&receiver, trace, REQUESTS),
        REQUESTS,
        (15, 5),
        "proxy",
    );
}

#[test]
fn a_tls_intercepting_proxy_is_attributed_per_request_and_each_leg_has_its_handshake() {
    let lab = lab();
    let interception = start_interception(&lab);
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = start(&lab, &receiver);
    // One trace per connection: the second connection's persona leg resumes the first's session.
    let traces = [
        "7af7651916cd43dd8448eb211c80319c",
        "8af7651916cd43dd8448eb211c80319c",
    ];
    let spans = intercepted_requests(&lab, &interception, &receiver, &traces);
    check_intercepted(&spans, &traces);
}
