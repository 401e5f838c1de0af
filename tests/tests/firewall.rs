//! End-to-end firewall attribution on one host: one agent watching the agent and persona
//! namespaces (not the fw, which stays uninstrumented) joins both sides of each request by its
//! traceparent and exports the firewall's forward and return time, through a plain L3
//! forwarder, through haproxy terminating TCP in the fw, and through haproxy intercepting TLS.

use hoptrace_tests::{
    agent::Agent,
    firewall::{
        PersonaTls, REQUESTS, check_intercepted, check_split, curl_requests, intercepted_requests,
        lab, set_delays, spans_of, start_haproxy, start_interception,
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

/// Through a TLS interception whose leg to the persona is `tls`: two connections, each in a
/// trace of its own.
fn intercepted(tls: PersonaTls, traces: [&str; 2]) {
    let lab = lab();
    let interception = start_interception(&lab, tls);
    let receiver = OtlpReceiver::start().expect("receiver");
    let _agent = start(&lab, &receiver);
    let spans = intercepted_requests(&lab, &interception, &receiver, &traces);
    check_intercepted(&spans, &traces, tls);
}

#[test]
fn a_tls_intercepting_proxy_is_attributed_per_request_and_each_leg_has_its_handshake() {
    intercepted(
        PersonaTls::FullTls12,
        [
            "7af7651916cd43dd8448eb211c80319c",
            "8af7651916cd43dd8448eb211c80319c",
        ],
    );
}

/// With TLS 1.3 towards the persona, the first request follows haproxy's Finished flight
/// closely enough for nginx to read both at once: its arrival is still its own segment's.
#[test]
fn a_tls_intercepting_proxy_with_tls13_towards_the_persona_times_each_first_request_alone() {
    intercepted(
        PersonaTls::Default,
        [
            "baf7651916cd43dd8448eb211c80319c",
            "caf7651916cd43dd8448eb211c80319c",
        ],
    );
}
