//! hoptrace's xtask library: the network-namespace test lab shared by the end-to-end tests,
//! the benchmarks and the demo.

pub mod bench;
pub mod lab;
pub mod otlp_count;
