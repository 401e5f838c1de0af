#!/usr/bin/env bash
# One idempotent setup step for a fresh machine (README, ./x, .ci/run all call it).
# Installs what hoptrace needs to build and test and mounts the kernel filesystems it uses.
# When everything is already present it only checks, and finishes in about a second.
set -euo pipefail

RUST_TOOLCHAIN=1.99.1        # keep in sync with rust-toolchain.toml (see ../shared TOOLCHAIN.md)
BPF_LINKER_VERSION=0.13.0
LLVM_FEATURE=llvm-23         # the LLVM major of $RUST_TOOLCHAIN; bpf-linker must match it
# Outside the work tree so that fresh clones on the same machine reuse the build.
TOOLS_DIR=${HOPTRACE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hoptrace}
BPF_LINKER_ROOT="$TOOLS_DIR/bpf-linker-$BPF_LINKER_VERSION-rust-$RUST_TOOLCHAIN"

# Debian packages: the lab's servers, clients and plumbing, and what the tests drive.
DEBIAN_PACKAGES=(iproute2 iptables nginx-light wrk curl python3 tcpdump
  libnetfilter-queue1 procps psmisc openssl haproxy
  caddy golang-1.19-go    # Go crypto/tls: Debian's stripped caddy, and the lab's own Go programs
  nodejs  # node: static OpenSSL with exported SSL_* (the TLS plaintext tests)
  bpftool) # the old-kernel test reads the verifier's output of the loaded programs
# PyPI packages: the OTLP receiver the end-to-end tests export to, and the OpenTelemetry SDK
# clients that test that receiver (googleapis-common-protos pinned so protobuf stays 4.25.5).
PYTHON_PACKAGES=(opentelemetry-proto==1.27.0 grpcio==1.66.2 protobuf==4.25.5
  opentelemetry-sdk==1.27.0 opentelemetry-exporter-otlp-proto-grpc==1.27.0
  opentelemetry-exporter-otlp-proto-http==1.27.0 googleapis-common-protos==1.65.0
  kubernetes-validate==1.37.0   # Kubernetes schemas shipped in the package: deploy/ tests
  prometheus-client==0.26.0)    # its text-format parsers read the agent's /metrics in tests

log() { printf 'setup: %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (installs packages, mounts tracefs/bpffs)"; exit 1
  fi
}

install_debian_packages() {
  local missing=()
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The lab starts its own servers inside namespaces; the host's default instances stay off.
  systemctl disable --now nginx haproxy caddy >/dev/null 2>&1 || true
  pkill -x nginx 2>/dev/null || true
}

install_python_packages() {
  if python3 -c 'import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc
import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc, opentelemetry.exporter.otlp.proto.http
import kubernetes_validate, yaml, prometheus_client.parser, prometheus_client.openmetrics.parser' 2>/dev/null; then
    return
  fi
  log "installing Python packages: ${PYTHON_PACKAGES[*]}"
  python3 -m pip install -q --disable-pip-version-check "${PYTHON_PACKAGES[@]}"
}

install_rust_toolchain() {
  if ! rustup run "$RUST_TOOLCHAIN" rustc --version >/dev/null 2>&1; then
    log "installing Rust $RUST_TOOLCHAIN"
    rustup toolchain install "$RUST_TOOLCHAIN" --profile minimal --no-self-update \
      --component rust-src,clippy,rustfmt
  fi
  if ! rustup component list --toolchain "$RUST_TOOLCHAIN" --installed 2>/dev/null | grep -q '^rust-src'; then
    rustup component add rust-src --toolchain "$RUST_TOOLCHAIN"
  fi
}

# bpf-linker links the eBPF crate's LLVM bitcode, so it must use the same LLVM as rustc.
# Every rustup toolchain ships its own libLLVM; build bpf-linker against a copy of it.
install_bpf_linker() {
  [ -x "$BPF_LINKER_ROOT/bin/bpf-linker" ] && return
  log "building bpf-linker $BPF_LINKER_VERSION against Rust $RUST_TOOLCHAIN's LLVM (about 2 minutes)"
  local sysroot llvm_so prefix
  sysroot=$(rustup run "$RUST_TOOLCHAIN" rustc --print sysroot)
  # The versioned file is the library; a plain libLLVM.so there may be a linker script.
  llvm_so=$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*' -type f | head -n1)
  [ -n "$llvm_so" ] || { log "no libLLVM in $sysroot/lib"; exit 1; }
  prefix="$BPF_LINKER_ROOT/llvm"
  mkdir -p "$prefix/lib"
  # A copy, not a link: a toolchain update must not swap the LLVM under a built linker.
  cp -f "$llvm_so" "$prefix/lib/"
  ln -sf "$(basename "$llvm_so")" "$prefix/lib/libLLVM.so"
  # LLVM_PREFIX always: Debian's llvm-config (an older LLVM) would be found otherwise.
  LLVM_PREFIX="$prefix" rustup run "$RUST_TOOLCHAIN" cargo install "bpf-linker@$BPF_LINKER_VERSION" \
    --locked --no-default-features --features "$LLVM_FEATURE" --root "$BPF_LINKER_ROOT.tmp" -q
  rm -rf "$BPF_LINKER_ROOT/bin" && mv "$BPF_LINKER_ROOT.tmp/bin" "$BPF_LINKER_ROOT/bin"
  rm -rf "$BPF_LINKER_ROOT.tmp"
}

mount_kernel_filesystems() {
  # Image builds (deploy/Dockerfile) cannot mount anything; the host provides the mounts there.
  if [ -n "${HOPTRACE_SKIP_MOUNTS:-}" ]; then
    log "HOPTRACE_SKIP_MOUNTS is set: not mounting tracefs or bpffs"; return
  fi
  if ! mountpoint -q /sys/kernel/tracing; then
    log "mounting tracefs at /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing
  fi
  if ! mountpoint -q /sys/fs/bpf; then
    log "mounting bpffs at /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
  fi
}

main() {
  # Callers read standard output as the linker's directory (./x: linker_dir=$(setup.sh)), so
  # everything the installers print goes to standard error: on a fresh machine rustup and apt
  # write progress to standard output, which would otherwise corrupt PATH.
  {
    need_root
    install_debian_packages
    install_python_packages
    install_rust_toolchain
    install_bpf_linker
    mount_kernel_filesystems
  } >&2
  echo "$BPF_LINKER_ROOT/bin"
}

main "$@"
