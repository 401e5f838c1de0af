//! golang.rs against real Go binaries: Debian's stripped caddy (.gopclntab only) and the lab's
//! self-built programs (with .symtab), built by xtask with Debian's golang-1.19.

use xtask::lab::golang::{GoProgram, go_binary};

use super::*;

const CADDY: &str = "/usr/bin/caddy";

/// `cmp rsp, [r14+0x10]` or, for big frames, `lea r12, [rsp-N]` then `cmp r12, [r14+0x10]`:
/// the stack-bound check that opens every Go function with a frame (g in R14,
/// g.stackguard0 at offset 16). Finding it at an entry shows the address is right: an entry
/// off by the .text/textStart difference (0x100 in caddy) lands mid-function.
fn opens_with_stack_check(code: &[u8]) -> bool {
    const CMP_RSP: [u8; 4] = [0x49, 0x3b, 0x66, 0x10];
    // lea r12, [rsp+disp8] / [rsp+disp32]
    const LEA_R12: [[u8; 4]; 2] = [[0x4c, 0x8d, 0x64, 0x24], [0x4c, 0x8d, 0xa4, 0x24]];
    const CMP_R12: [u8; 4] = [0x4d, 0x3b, 0x66, 0x10];
    code.starts_with(&CMP_RSP)
        || (LEA_R12.iter().any(|lea| code.starts_with(lea))
            && code[4..16].windows(4).any(|w| w == CMP_R12))
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e} (scripts/setup.sh installs it)"))
}

fn assert_probe_points(data: &[u8], function: &GoFunction) {
    let entry = function.entry_offset as usize;
    assert!(
        opens_with_stack_check(&data[entry..entry + 16]),
        "{} entry: {:02x?}",
        function.name,
        &data[entry..entry + 16]
    );
    assert!(!function.ret_offsets.is_empty());
    for &ret in &function.ret_offsets {
        assert!(
            ret > function.entry_offset,
            "{} RET before entry",
            function.name
        );
        assert_eq!(
            data[ret as usize], 0xc3,
            "{} RET at {ret:#x}",
            function.name
        );
    }
}

#[test]
fn stripped_caddy_through_pclntab() {
    let data = read(CADDY);
    let binary = analyze(data.as_slice()).expect("caddy analysed");
    assert_eq!(binary.source, SymbolSource::Pclntab);
    assert!(
        binary.go_version.starts_with("go1.19"),
        "{}",
        binary.go_version
    );
    assert_probe_points(&data, &binary.write);
    assert_probe_points(&data, &binary.read);
    assert_probe_points(&data, &binary.handshake);
    assert_ne!(binary.write.entry_offset, binary.read.entry_offset);
}

#[test]
fn caddy_text_start_differs_from_text_section() {
    // The reason textStart must come from the pclntab header (TESTBED.md).
    let data = read(CADDY);
    let elf = object::File::parse(&*data).unwrap();
    let text = elf.section_by_name(".text").unwrap().address();
    let pclntab = elf.section_by_name(".gopclntab").unwrap().data().unwrap();
    let header = pcln_header(pclntab).unwrap();
    assert!(header.entries_are_offsets);
    assert_ne!(header.text_start, text);
}

#[test]
fn self_built_symtab_and_pclntab_agree() {
    let path = go_binary(GoProgram::Https).expect("Go HTTPS program built");
    let data = std::fs::read(&path).unwrap();
    let binary = analyze(data.as_slice()).expect("analysed");
    assert_eq!(binary.source, SymbolSource::Symtab);
    assert!(
        binary.go_version.starts_with("go1."),
        "{}",
        binary.go_version
    );
    assert_probe_points(&data, &binary.write);
    assert_probe_points(&data, &binary.read);

    let elf = object::File::parse(&*data).unwrap();
    let from_symtab = symtab_ranges(&elf).expect("has .symtab");
    let pclntab = elf.section_by_name(".gopclntab").unwrap().data().unwrap();
    let from_pclntab = pclntab_ranges(pclntab).unwrap();
    for (name, symtab, pclntab) in [
        (WRITE_SYMBOL, from_symtab.write, from_pclntab.write),
        (READ_SYMBOL, from_symtab.read, from_pclntab.read),
        (
            HANDSHAKE_SYMBOL,
            from_symtab.handshake,
            from_pclntab.handshake,
        ),
    ] {
        let ((start, end), (pcln_start, pcln_end)) = symtab.zip(pclntab).expect(name);
        assert_eq!(start, pcln_start, "{name}");
        // The function table's end includes the INT3 padding up to the next function
        // (32-byte alignment); the symbol's size does not. The RETs found are the same.
        assert!(
            (end..end + 32).contains(&pcln_end),
            "{name}: {end:#x} {pcln_end:#x}"
        );
        assert_eq!(
            locate(&elf, name, start, end).unwrap(),
            locate(&elf, name, pcln_start, pcln_end).unwrap()
        );
    }
}

#[test]
fn go_program_without_crypto_tls_is_refused() {
    let path = go_binary(GoProgram::PlainTcp).expect("Go TCP program built");
    let error = analyze_file(&path).unwrap_err();
    assert!(
        matches!(error, GoBinaryError::NoCryptoTls(WRITE_SYMBOL)),
        "{error}"
    );
}

#[test]
fn unknown_pclntab_layout_is_refused() {
    let mut data = read(CADDY);
    let elf = object::File::parse(&*data).unwrap();
    let (offset, _) = elf
        .section_by_name(".gopclntab")
        .unwrap()
        .file_range()
        .unwrap();
    drop(elf);
    data[offset as usize..offset as usize + 4].copy_from_slice(&0xffff_fff9u32.to_le_bytes());
    let error = analyze(data.as_slice()).unwrap_err();
    assert!(
        matches!(error, GoBinaryError::UnsupportedPclntab(0xffff_fff9)),
        "{error}"
    );
    assert!(error.to_string().contains("unsupported .gopclntab layout"));
}

#[test]
fn non_go_and_non_elf_files_are_refused() {
    let error = analyze(read("/bin/true").as_slice()).unwrap_err();
    assert!(matches!(error, GoBinaryError::NotGo), "{error}");
    let error = analyze(&b"#!/bin/sh\necho not an ELF\n"[..]).unwrap_err();
    assert!(matches!(error, GoBinaryError::NotElf(_)), "{error}");
}

#[test]
fn truncated_or_damaged_binaries_fail_cleanly() {
    let data = read(CADDY);
    // Cut anywhere (header, text, pclntab, buildinfo): an error or a result, never a panic.
    for cut in [
        64,
        4096,
        data.len() / 3,
        data.len() / 2,
        data.len() * 9 / 10,
        data.len() - 1,
    ] {
        let _ = analyze(&data[..cut]);
    }
    // A function table that claims more functions than the section holds.
    let elf = object::File::parse(&*data).unwrap();
    let pclntab = elf.section_by_name(".gopclntab").unwrap().data().unwrap();
    let mut damaged = pclntab.to_vec();
    damaged[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        pclntab_ranges(&damaged),
        Err(GoBinaryError::Malformed { .. })
    ));
    damaged[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        pclntab_ranges(&damaged),
        Err(GoBinaryError::Malformed { .. })
    ));
}

#[test]
fn register_abi_versions() {
    for (version, supported) in [
        ("go1.16.15", false),
        ("go1.9", false),
        ("go1.17", true),
        ("go1.19.8", true),
        ("go1.22rc1", true),
        ("go2.0", true),
        ("devel go1.23-abc", true),
        ("", false),
    ] {
        assert_eq!(register_abi(version), supported, "{version}");
    }
}
