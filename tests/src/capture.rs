//! Packet captures on the fw's interfaces as the accuracy benchmark's truth (tests/accuracy.rs):
//! tcpdump writing nanosecond pcaps, a reader for the IPv4/TCP segments in them, and the first
//! application-data record of each TLS connection found by TCP sequence number.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Duration};

use xtask::lab::{Background, Host, Lab};

/// One TCP segment with payload, as captured.
pub struct Packet {
    pub time_ns: u64,
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub seq: u32,
    /// The captured payload (all of it: the capture keeps whole frames).
    pub payload: Vec<u8>,
}

/// Reads a nanosecond pcap of Ethernet frames (what `tcpdump --time-stamp-precision=nano -w`
/// writes on a veth); IPv4/TCP segments with payload only.
pub fn read_pcap(path: &Path) -> Vec<Packet> {
    let data = std::fs::read(path).expect("pcap");
    assert!(data.len() >= 24, "empty capture {}", path.display());
    let magic = u32::from_le_bytes(data[0..4].try_into().unwrap());
    assert_eq!(magic, 0xa1b2_3c4d, "not a little-endian nanosecond pcap");
    let le32 = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap());
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let mut packets = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let (sec, nsec, caplen) = (
            le32(&data[at..]) as u64,
            le32(&data[at + 4..]) as u64,
            le32(&data[at + 8..]) as usize,
        );
        let frame = &data[at + 16..(at + 16 + caplen).min(data.len())];
        at += 16 + caplen;
        // Ethernet II, IPv4, TCP.
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = (ip[0] & 0x0f) as usize * 4;
        if ip[9] != 6 || ip.len() < ihl + 20 {
            continue;
        }
        let total = be16(&ip[2..]) as usize;
        let tcp = &ip[ihl..];
        let offset = (tcp[12] >> 4) as usize * 4;
        let payload_len = total.saturating_sub(ihl + offset);
        if payload_len == 0 || tcp.len() < offset {
            continue;
        }
        let address = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        packets.push(Packet {
            time_ns: sec * 1_000_000_000 + nsec,
            src: (address(&ip[12..]), be16(tcp)),
            dst: (address(&ip[16..]), be16(&tcp[2..])),
            seq: u32::from_be_bytes(tcp[4..8].try_into().unwrap()),
            payload: tcp[offset..(offset + payload_len).min(tcp.len())].to_vec(),
        });
    }
    packets
}

/// tcpdump on one of the fw's interfaces writing whole frames to `path`; stops (and flushes)
/// when dropped.
pub fn capture(lab: &Lab, iface: &str, path: &Path) -> Background {
    let process = lab
        .spawn(
            Host::Fw,
            &[
                "tcpdump",
                "-i",
                iface,
                "-U",
                "-s",
                "0",
                "--time-stamp-precision=nano",
                "-w",
                path.to_str().unwrap(),
                "tcp",
            ],
        )
        .expect("tcpdump");
    // tcpdump writes the file header once it listens.
    for _ in 0..100 {
        if std::fs::metadata(path).is_ok_and(|m| m.len() >= 24) {
            return process;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("tcpdump on {iface} did not start");
}

/// TLS record content type of application data.
const APPLICATION_DATA: u8 = 23;

/// One TLS connection seen on an interface: when the first byte of each side's first
/// application-data record crossed it.
#[derive(Clone, Copy, Debug)]
pub struct TlsConnection {
    /// The client's port (what tells connections apart on one leg).
    pub client_port: u16,
    /// The client's first application-data record (its first request).
    pub request_ns: u64,
    /// The server's first application-data record (the response to it).
    pub response_ns: u64,
}

/// The TLS connections to `server_port` in `packets`, in the order of their first request.
///
/// Each direction of a connection is reassembled by sequence number from its first segment
/// (the ClientHello or ServerHello, which start the stream), the TLS records are walked from
/// there, and the first record of type application data gives the sequence number of the
/// request's (response's) first byte; its time is when the first segment holding that byte
/// crossed the interface (a retransmission is later, so the earliest counts). In TLS 1.2 only
/// application data travels in such records (in TLS 1.3 the encrypted handshake and session
/// tickets do too): run both legs with TLS 1.2.
pub fn tls_connections(packets: &[Packet], server_port: u16) -> Vec<TlsConnection> {
    // (client port, towards the server) -> its segments.
    let mut streams: BTreeMap<(u16, bool), Vec<&Packet>> = BTreeMap::new();
    for packet in packets {
        let key = if packet.dst.1 == server_port {
            (packet.src.1, true)
        } else if packet.src.1 == server_port {
            (packet.dst.1, false)
        } else {
            continue;
        };
        streams.entry(key).or_default().push(packet);
    }
    let mut connections: Vec<TlsConnection> = streams
        .iter()
        .filter(|((_, to_server), _)| *to_server)
        .filter_map(|(&(port, _), requests)| {
            let responses = streams.get(&(port, false))?;
            Some(TlsConnection {
                client_port: port,
                request_ns: first_application_data(requests)?,
                response_ns: first_application_data(responses)?,
            })
        })
        .collect();
    connections.sort_by_key(|c| c.request_ns);
    connections
}

/// When the first byte of the first application-data record of one direction's segments
/// crossed the interface.
fn first_application_data(segments: &[&Packet]) -> Option<u64> {
    let start = segments.first()?.seq;
    // Offsets into the stream (wrapping sequence numbers), first capture of each kept.
    let offset = |p: &Packet| p.seq.wrapping_sub(start) as usize;
    let mut stream: Vec<Option<u8>> = Vec::new();
    for segment in segments {
        let at = offset(segment);
        if at > 1 << 24 {
            // Before the first segment (a retransmission of nothing we know): not the stream.
            continue;
        }
        if stream.len() < at + segment.payload.len() {
            stream.resize(at + segment.payload.len(), None);
        }
        for (i, byte) in segment.payload.iter().enumerate() {
            stream[at + i].get_or_insert(*byte);
        }
    }
    let mut record = 0;
    let target = loop {
        let header: Option<Vec<u8>> = stream.get(record..record + 5)?.iter().copied().collect();
        let header = header?;
        if header[0] == APPLICATION_DATA {
            break record;
        }
        record += 5 + u16::from_be_bytes([header[3], header[4]]) as usize;
    };
    segments
        .iter()
        .filter(|s| {
            let at = offset(s);
            at <= target && target < at + s.payload.len()
        })
        .map(|s| s.time_ns)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(time_ns: u64, from_client: bool, seq: u32, payload: &[u8]) -> Packet {
        let (client, server) = (
            (Ipv4Addr::new(10, 0, 0, 1), 40000),
            (Ipv4Addr::new(10, 0, 0, 2), 443),
        );
        let (src, dst) = if from_client {
            (client, server)
        } else {
            (server, client)
        };
        Packet {
            time_ns,
            src,
            dst,
            seq,
            payload: payload.to_vec(),
        }
    }

    fn record(kind: u8, len: usize) -> Vec<u8> {
        // Filled with the application-data type: only headers may tell records apart.
        let mut r = vec![kind, 3, 3, (len >> 8) as u8, len as u8];
        r.resize(5 + len, APPLICATION_DATA);
        r
    }

    #[test]
    fn finds_the_first_application_data_record_across_segments_and_retransmissions() {
        // Client: hello (in two segments), then key exchange + CCS + finished, then the request.
        let hello = record(22, 300);
        let mut flight = record(22, 70);
        flight.extend(record(20, 1));
        flight.extend(record(22, 40));
        let request = record(23, 120);
        let hello_end = hello.len() as u32;
        let flight_end = hello_end + flight.len() as u32;
        let base = u32::MAX - 100; // sequence numbers wrap inside the stream
        let mut packets = vec![
            segment(10, true, base, &hello[..200]),
            segment(11, true, base.wrapping_add(200), &hello[200..]),
            segment(30, true, base.wrapping_add(hello_end), &flight),
            segment(50, true, base.wrapping_add(flight_end), &request[..60]),
            // A retransmission of the request's first segment: later, not the truth.
            segment(70, true, base.wrapping_add(flight_end), &request[..60]),
        ];
        // Server: hello flight, finished, then the response.
        let server_hello = record(22, 23 * 40);
        let finished = record(22, 40);
        let response = record(23, 500);
        let (sh, fin) = (server_hello.len() as u32, finished.len() as u32);
        packets.extend([
            segment(20, false, 7, &server_hello),
            segment(40, false, 7 + sh, &finished),
            segment(60, false, 7 + sh + fin, &response),
        ]);
        let connections = tls_connections(&packets, 443);
        assert_eq!(connections.len(), 1);
        let c = connections[0];
        assert_eq!(
            (c.client_port, c.request_ns, c.response_ns),
            (40000, 50, 60)
        );
    }

    #[test]
    fn a_connection_without_application_data_is_left_out() {
        let packets = [
            segment(10, true, 1, &record(22, 30)),
            segment(20, false, 1, &record(22, 30)),
        ];
        assert!(tls_connections(&packets, 443).is_empty());
    }
}
