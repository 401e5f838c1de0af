//! Ring-buffer bytes to typed events: length-checked, dispatched on the header's kind byte.

use tracer_common::conn::{ConnEvent, kind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Conn(ConnEvent),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record of kind {kind} has {len} bytes, expected {expected}")]
    Length { kind: u8, len: usize, expected: usize },
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let &kind = bytes.first().ok_or(DecodeError::Empty)?;
    match kind {
        kind::CONN => read_record::<ConnEvent>(kind, bytes).map(Event::Conn),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// Copies a `#[repr(C)]` record out of `bytes` (which need not be aligned).
fn read_record<T: aya::Pod>(kind: u8, bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(DecodeError::Length { kind, len: bytes.len(), expected });
    }
    // SAFETY: T is Pod (any bit pattern is valid) and `bytes` holds at least size_of::<T>().
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use tracer_common::conn::EventHeader;

    use super::*;

    fn conn_bytes() -> Vec<u8> {
        let mut event: ConnEvent = unsafe { std::mem::zeroed() };
        event.header = EventHeader { kind: kind::CONN, _pad: [0; 3], tgid: 42, ts_ns: 7 };
        event.sport = 80;
        let ptr = (&event as *const ConnEvent).cast::<u8>();
        unsafe { std::slice::from_raw_parts(ptr, size_of::<ConnEvent>()) }.to_vec()
    }

    #[test]
    fn decodes_a_connection_record() {
        let Event::Conn(event) = decode(&conn_bytes()).unwrap();
        assert_eq!((event.header.tgid, event.header.ts_ns, event.sport), (42, 7, 80));
    }

    #[test]
    fn rejects_short_unknown_and_empty_records() {
        let bytes = conn_bytes();
        assert_eq!(
            decode(&bytes[..50]),
            Err(DecodeError::Length { kind: kind::CONN, len: 50, expected: 104 })
        );
        assert_eq!(decode(&[200, 0, 0]), Err(DecodeError::UnknownKind(200)));
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }
}
