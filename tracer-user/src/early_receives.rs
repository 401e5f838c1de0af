//! Receives that reach a client socket's assembler before the record of the request they
//! answer. TLS plaintext is emitted when the library call returns, and Go's HTTP client writes
//! a request and reads its response on two goroutines (two threads): on a loaded host the
//! writer can be descheduled between its ciphertext syscall and `Write`'s return long enough
//! for the reader's `Read` to return the response first, so the response's record comes out of
//! the ring buffer before the request's. Such receives are held on their socket (nothing is in
//! flight there) and replayed once a send put a request in flight, or processed as they are
//! when they waited longer than the connect hold or the socket goes.

use std::collections::VecDeque;

use tracer_common::data::DataEvent;

/// At most this many receives wait on one socket; more are processed as they come.
const MAX_PER_SOCKET: usize = 4;
/// At most this many receives wait in all (a record is 1.2 KiB).
pub const MAX_HELD: usize = 1024;

/// A receive record as the assembler got it.
#[derive(Debug)]
pub struct Early {
    pub event: Box<DataEvent>,
    pub library_ns: u64,
    pub plaintext_from: Option<&'static str>,
}

/// The receives waiting on one socket, oldest first.
#[derive(Debug, Default)]
pub struct EarlyReceives {
    records: VecDeque<Early>,
    /// When the oldest was held (the record's ts_ns).
    since_ns: u64,
}

impl EarlyReceives {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Holds `early` unless this socket or the assembler (`held`, all sockets' count) is full;
    /// then gives it back to be processed now.
    pub fn hold(&mut self, early: Early, held: &mut usize) -> Result<(), Early> {
        if self.records.len() >= MAX_PER_SOCKET || *held >= MAX_HELD {
            return Err(early);
        }
        if self.records.is_empty() {
            self.since_ns = early.event.header.ts_ns;
        }
        self.records.push_back(early);
        *held += 1;
        Ok(())
    }

    /// Whether the oldest has waited longer than `hold_ns` at `now_ns`.
    pub fn waited_longer(&self, now_ns: u64, hold_ns: u64) -> bool {
        !self.records.is_empty() && now_ns.saturating_sub(self.since_ns) > hold_ns
    }

    /// Everything held, oldest first, to be replayed.
    pub fn take(&mut self, held: &mut usize) -> VecDeque<Early> {
        *held = held.saturating_sub(self.records.len());
        std::mem::take(&mut self.records)
    }
}
