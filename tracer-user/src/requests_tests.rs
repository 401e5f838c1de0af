//! Replay tests of the request assembler: synthetic kernel records in, spans out.

use super::*;
