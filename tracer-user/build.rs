//! Builds the eBPF object (tracer-ebpf, for bpfel-unknown-none) and leaves it in OUT_DIR, where
//! src/ebpf.rs embeds it. bpf-linker must be on PATH: `./x` and scripts/setup.sh see to that.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../tracer-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {ebpf_dir:?}"))?;
    // The same toolchain as the host build (rust-toolchain.toml): bpf-linker was built against
    // its LLVM. It is a stable toolchain, so -Z build-std=core needs RUSTC_BOOTSTRAP, which
    // aya-build reads from this process's environment and passes to its nested cargo only.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.99.1".into());
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = aya_build::Package {
        name: "tracer-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
}
