//! Ring-buffer bytes to typed events: length-checked, dispatched on the header's kind byte.

use tracer_common::{
    conn::{ConnEvent, kind},
    data::{DATA_HEADER_LEN, DataEvent, MAX_CAPTURE},
    handshake_call::HandshakeCallEvent,
    plaintext::{PLAINTEXT_HEADER_LEN, PlaintextEvent},
};

/// A decoded record; data and plaintext records borrow the [`Decoder`]'s buffers.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Conn(ConnEvent),
    Data(&'a DataEvent),
    /// TLS plaintext from a library uprobe.
    Plaintext(&'a PlaintextEvent),
    /// A TLS library reported a handshake done or failed.
    HandshakeCall(HandshakeCallEvent),
}

/// Decodes records into buffers it reuses: a data record is 1.1 KiB, most of it payload room,
/// and at tens of thousands of records per second a fresh allocation and three copies each
/// showed in the agent's profile.
pub struct Decoder {
    data: Box<DataEvent>,
    plaintext: Box<PlaintextEvent>,
}

impl Default for Decoder {
    fn default() -> Self {
        // SAFETY: both are Pod records: all-zero bytes are valid values.
        Self {
            data: Box::new(unsafe { std::mem::zeroed() }),
            plaintext: Box::new(unsafe { std::mem::zeroed() }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record of kind {kind} has {len} bytes, expected {expected}")]
    Length {
        kind: u8,
        len: usize,
        expected: usize,
    },
    #[error("data record claims {claimed} captured bytes, carries {carried}")]
    Captured { claimed: usize, carried: usize },
}

impl Decoder {
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
        let &kind = bytes.first().ok_or(DecodeError::Empty)?;
        match kind {
            kind::CONN => read_record::<ConnEvent>(kind, bytes).map(Event::Conn),
            kind::DATA => {
                fill_with_payload(&mut *self.data, kind, bytes, DATA_HEADER_LEN, |e| {
                    e.captured
                })?;
                Ok(Event::Data(&self.data))
            }
            kind::PLAINTEXT => {
                fill_with_payload(
                    &mut *self.plaintext,
                    kind,
                    bytes,
                    PLAINTEXT_HEADER_LEN,
                    |e| e.data.captured,
                )?;
                Ok(Event::Plaintext(&self.plaintext))
            }
            kind::HANDSHAKE_CALL => {
                read_record::<HandshakeCallEvent>(kind, bytes).map(Event::HandshakeCall)
            }
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

/// A record with a payload (data, plaintext) is its fixed part (`header_len` bytes) plus only
/// the captured bytes, which the record says how many they are. Copied over `target`: the
/// payload room past them keeps an earlier record's bytes, which nothing reads.
fn fill_with_payload<T: aya::Pod>(
    target: &mut T,
    kind: u8,
    bytes: &[u8],
    header_len: usize,
    captured: impl Fn(&T) -> u16,
) -> Result<(), DecodeError> {
    if bytes.len() < header_len {
        return Err(DecodeError::Length {
            kind,
            len: bytes.len(),
            expected: header_len,
        });
    }
    let carried = bytes.len().min(size_of::<T>());
    // SAFETY: T is Pod (any bytes make a valid T) and at most size_of::<T>() bytes are copied
    // into it, from a slice that holds them.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (target as *mut T).cast::<u8>(), carried)
    };
    let claimed = usize::from(captured(target));
    if claimed > MAX_CAPTURE || claimed > carried - header_len {
        return Err(DecodeError::Captured {
            claimed,
            carried: carried - header_len,
        });
    }
    Ok(())
}

/// Copies a `#[repr(C)]` record out of `bytes` (which need not be aligned).
fn read_record<T: aya::Pod>(kind: u8, bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(DecodeError::Length {
            kind,
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: T is Pod (any bit pattern is valid) and `bytes` holds at least size_of::<T>().
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use tracer_common::conn::EventHeader;

    use super::*;

    /// For the error cases: the events themselves borrow the decoder.
    fn decode(bytes: &[u8]) -> Result<(), DecodeError> {
        Decoder::default().decode(bytes).map(|_| ())
    }

    fn conn_bytes() -> Vec<u8> {
        let mut event: ConnEvent = unsafe { std::mem::zeroed() };
        event.header = EventHeader {
            kind: kind::CONN,
            _pad: [0; 3],
            tgid: 42,
            ts_ns: 7,
        };
        event.sport = 80;
        let ptr = (&event as *const ConnEvent).cast::<u8>();
        unsafe { std::slice::from_raw_parts(ptr, size_of::<ConnEvent>()) }.to_vec()
    }

    #[test]
    fn decodes_a_connection_record() {
        let mut decoder = Decoder::default();
        let Ok(Event::Conn(event)) = decoder.decode(&conn_bytes()) else {
            panic!()
        };
        assert_eq!(
            (event.header.tgid, event.header.ts_ns, event.sport),
            (42, 7, 80)
        );
    }

    fn data_bytes(payload: &[u8], captured: u16) -> Vec<u8> {
        let mut event: DataEvent = unsafe { std::mem::zeroed() };
        event.header.kind = kind::DATA;
        event.len = payload.len() as u32;
        event.captured = captured;
        event.data[..payload.len()].copy_from_slice(payload);
        let ptr = (&event as *const DataEvent).cast::<u8>();
        let all = unsafe { std::slice::from_raw_parts(ptr, size_of::<DataEvent>()) };
        all[..DATA_HEADER_LEN + payload.len()].to_vec()
    }

    #[test]
    fn decodes_a_data_record_of_any_captured_length() {
        let bytes = data_bytes(b"GET / HTTP/1.1\r\n", 16);
        let mut decoder = Decoder::default();
        let Ok(Event::Data(event)) = decoder.decode(&bytes) else {
            panic!()
        };
        assert_eq!(&event.data[..16], b"GET / HTTP/1.1\r\n");
        assert!(matches!(
            decode(&data_bytes(b"abc", 500)),
            Err(DecodeError::Captured { .. })
        ));
        assert!(matches!(
            decode(&bytes[..50]),
            Err(DecodeError::Length { .. })
        ));
    }

    #[test]
    fn decodes_a_plaintext_record_and_checks_its_captured_length() {
        let mut event: PlaintextEvent = unsafe { std::mem::zeroed() };
        event.header.kind = kind::PLAINTEXT;
        event.library_enter_ns = 11;
        event.data.captured = 3;
        event.data.data[..3].copy_from_slice(b"GET");
        let bytes = |event: &PlaintextEvent| {
            let ptr = (event as *const PlaintextEvent).cast::<u8>();
            unsafe { std::slice::from_raw_parts(ptr, size_of::<PlaintextEvent>()) }.to_vec()
        };
        let all = bytes(&event);
        let mut decoder = Decoder::default();
        let Ok(Event::Plaintext(decoded)) = decoder.decode(&all[..PLAINTEXT_HEADER_LEN + 3]) else {
            panic!()
        };
        assert_eq!(
            (decoded.library_enter_ns, &decoded.data.data[..3]),
            (11, &b"GET"[..])
        );
        event.data.captured = 500;
        let all = bytes(&event);
        assert!(matches!(
            decode(&all[..PLAINTEXT_HEADER_LEN + 3]),
            Err(DecodeError::Captured { .. })
        ));
        assert!(matches!(
            decode(&all[..PLAINTEXT_HEADER_LEN - 1]),
            Err(DecodeError::Length { .. })
        ));
    }

    #[test]
    fn rejects_short_unknown_and_empty_records() {
        let bytes = conn_bytes();
        assert_eq!(
            decode(&bytes[..50]),
            Err(DecodeError::Length {
                kind: kind::CONN,
                len: 50,
                expected: 104
            })
        );
        assert_eq!(decode(&[200, 0, 0]), Err(DecodeError::UnknownKind(200)));
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }
}
