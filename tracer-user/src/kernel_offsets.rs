//! Offsets of the kernel struct fields the probes read, resolved from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE field relocations yet, so the loader does what libbpf would do at load
//! time: look each field up in /sys/kernel/btf/vmlinux (walking through anonymous unions and
//! structs, which is where fields like `sock.__sk_common.skc_net` live) and pass the byte
//! offsets to the programs as a load-time global.

use btf_rs::{Btf, Type};
use tracer_common::maps::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error(
        "cannot read kernel BTF at {VMLINUX_BTF} (kernel built without CONFIG_DEBUG_INFO_BTF?): {0}"
    )]
    NoBtf(String),
    #[error("struct {0} not found in kernel BTF")]
    NoStruct(String),
    #[error("field {field} not found in struct {owner} (kernel BTF)")]
    NoField { owner: String, field: String },
    #[error("field {0} is a bitfield or not byte-aligned")]
    Unaligned(String),
    #[error("BTF: {0}")]
    Btf(String),
}

pub fn resolve() -> Result<KernelOffsets, OffsetError> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| OffsetError::NoBtf(e.to_string()))?;
    Ok(KernelOffsets {
        sock_net: offset_of(&btf, "sock", &["__sk_common", "skc_net"])?,
        net_inum: offset_of(&btf, "net", &["ns", "inum"])?,
        sock_err: offset_of(&btf, "sock", &["sk_err"])?,
        tcp_srtt_us: offset_of(&btf, "tcp_sock", &["srtt_us"])?,
        sock_daddr: offset_of(&btf, "sock", &["__sk_common", "skc_daddr"])?,
        sock_rcv_saddr: offset_of(&btf, "sock", &["__sk_common", "skc_rcv_saddr"])?,
        sock_dport: offset_of(&btf, "sock", &["__sk_common", "skc_dport"])?,
        sock_num: offset_of(&btf, "sock", &["__sk_common", "skc_num"])?,
        sock_family: offset_of(&btf, "sock", &["__sk_common", "skc_family"])?,
        sock_v6_daddr: offset_of(&btf, "sock", &["__sk_common", "skc_v6_daddr"])?,
        sock_v6_rcv_saddr: offset_of(&btf, "sock", &["__sk_common", "skc_v6_rcv_saddr"])?,
        task_nsproxy: offset_of(&btf, "task_struct", &["nsproxy"])?,
        nsproxy_net_ns: offset_of(&btf, "nsproxy", &["net_ns"])?,
        tcp_write_seq: offset_of(&btf, "tcp_sock", &["write_seq"])?,
        tcp_copied_seq: offset_of(&btf, "tcp_sock", &["copied_seq"])?,
    })
}

/// Byte offset of `path` (a chain of member names) inside `struct owner`.
pub fn offset_of(btf: &Btf, owner: &str, path: &[&str]) -> Result<u32, OffsetError> {
    let mut current = btf
        .resolve_types_by_name(owner)
        .map_err(|_| OffsetError::NoStruct(owner.into()))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(|| OffsetError::NoStruct(owner.into()))?;
    let mut bits = 0u32;
    for field in path {
        let (Type::Struct(ref composite) | Type::Union(ref composite)) = current else {
            return Err(OffsetError::NoField {
                owner: owner.into(),
                field: (*field).into(),
            });
        };
        let (member_bits, member_type) =
            find_member(btf, composite, field, 0)?.ok_or_else(|| OffsetError::NoField {
                owner: owner.into(),
                field: (*field).into(),
            })?;
        bits += member_bits;
        current = member_type;
    }
    if !bits.is_multiple_of(8) {
        return Err(OffsetError::Unaligned(path.join(".")));
    }
    Ok(bits / 8)
}

/// Finds `name` among the members of `composite`, descending into anonymous members (bounded by
/// `depth`: the kernel nests a few levels at most). Returns the bit offset and the member's type
/// with typedefs and qualifiers peeled off.
fn find_member(
    btf: &Btf,
    composite: &btf_rs::Struct,
    name: &str,
    depth: u32,
) -> Result<Option<(u32, Type)>, OffsetError> {
    if depth > 8 {
        return Ok(None);
    }
    for member in &composite.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        let member_type = peel(btf, btf.resolve_chained_type(member).map_err(btf_err)?)?;
        if member_name == name {
            if member.bitfield_size().is_some_and(|size| size != 0) {
                return Err(OffsetError::Unaligned(name.into()));
            }
            return Ok(Some((member.bit_offset(), member_type)));
        }
        if member_name.is_empty()
            && let Type::Struct(ref inner) | Type::Union(ref inner) = member_type
            && let Some((bits, found)) = find_member(btf, inner, name, depth + 1)?
        {
            return Ok(Some((member.bit_offset() + bits, found)));
        }
    }
    Ok(None)
}

/// Strips typedefs and qualifiers: `possible_net_t` is a typedef of a struct, for instance.
fn peel(btf: &Btf, mut ty: Type) -> Result<Type, OffsetError> {
    for _ in 0..16 {
        let next = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Const(t) => btf.resolve_chained_type(t),
            Type::Volatile(t) => btf.resolve_chained_type(t),
            Type::Restrict(t) => btf.resolve_chained_type(t),
            Type::TypeTag(t) => btf.resolve_chained_type(t),
            _ => return Ok(ty),
        };
        ty = next.map_err(btf_err)?;
    }
    Ok(ty)
}

fn btf_err(e: impl std::fmt::Display) -> OffsetError {
    OffsetError::Btf(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against the machine's own kernel BTF; every kernel hoptrace supports has it.
    #[test]
    fn resolves_the_fields_the_probes_read() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        }
        let offsets = resolve().expect("offsets");
        // skc_net sits in sock_common, which is the first member of struct sock.
        assert!(
            offsets.sock_net > 0 && offsets.sock_net < 136,
            "{offsets:?}"
        );
        assert!(offsets.sock_err > offsets.sock_net, "{offsets:?}");
        assert!(
            offsets.tcp_srtt_us > 1000,
            "srtt_us lies deep in tcp_sock: {offsets:?}"
        );
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        assert!(matches!(
            offset_of(&btf, "sock", &["no_such_field"]),
            Err(OffsetError::NoField { .. })
        ));
        assert!(matches!(
            offset_of(&btf, "no_such_struct", &["x"]),
            Err(OffsetError::NoStruct(_))
        ));
    }
}
