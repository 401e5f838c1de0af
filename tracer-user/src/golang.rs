//! Where to probe a Go binary's crypto/tls: the file offsets of `crypto/tls.(*Conn).Write`,
//! `.Read` and `.handshakeContext`, and of every RET instruction inside them.
//!
//! Go moves goroutine stacks, so a uretprobe (which overwrites the return address on the
//! stack) can crash the program; the exit probes go on the RET instructions instead, found by
//! decoding each function's machine code. Functions are found in `.symtab` when the binary
//! has one, else in `.gopclntab` (the runtime's own function table, present even in stripped
//! binaries such as Debian's caddy). The probes read arguments from Go's register ABI (amd64,
//! Go 1.17+: receiver in AX, slice pointer and length in BX and CX, results in AX, BX/CX, the
//! current goroutine in R14), so anything older, or any other architecture, is refused with a
//! clear error rather than probed with the wrong registers.

use std::path::Path;

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use object::{Architecture, Object as _, ObjectSection as _, ObjectSymbol as _, ReadRef};

/// The probed methods, by their Go symbol names.
pub const WRITE_SYMBOL: &str = "crypto/tls.(*Conn).Write";
pub const READ_SYMBOL: &str = "crypto/tls.(*Conn).Read";
/// Probed for the socket only: net/http handshakes before its first Read (Go 1.17+).
pub const HANDSHAKE_SYMBOL: &str = "crypto/tls.(*Conn).handshakeContext";

/// Why a binary is not probed. Every variant is a clear "skip this binary" for the caller.
#[derive(Debug, thiserror::Error)]
pub enum GoBinaryError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not an ELF file: {0}")]
    NotElf(object::Error),
    #[error("not a Go program (no .go.buildinfo or .gopclntab section)")]
    NotGo,
    #[error("{0:?} is not supported: the probes read amd64 registers")]
    Architecture(Architecture),
    #[error(
        "Go {0} is not supported: crypto/tls probes need Go's register ABI on amd64 (Go 1.17+)"
    )]
    UnsupportedVersion(String),
    #[error(
        "unsupported .gopclntab layout (magic {0:#x}): known are Go 1.16-1.17, 1.18-1.19, 1.20+"
    )]
    UnsupportedPclntab(u32),
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("no crypto/tls in this Go program ({0} not found)")]
    NoCryptoTls(&'static str),
    #[error("{function}: no RET instruction found, so no exit probe can be placed")]
    NoReturn { function: &'static str },
}

fn malformed(what: &'static str) -> GoBinaryError {
    GoBinaryError::Malformed { what }
}

/// Where a function's symbol came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SymbolSource {
    Symtab,
    Pclntab,
}

/// One probed function: file offsets, ready for a uprobe on the binary's path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoFunction {
    pub name: &'static str,
    /// Virtual address of the first instruction.
    pub address: u64,
    /// File offset of the first instruction (the entry probe).
    pub entry_offset: u64,
    /// File offsets of every RET instruction (the exit probes).
    pub ret_offsets: Vec<u64>,
}

/// A Go program's crypto/tls probe points.
#[derive(Clone, Debug)]
pub struct GoTlsBinary {
    /// `go1.19.8`, from the build info.
    pub go_version: String,
    pub source: SymbolSource,
    pub write: GoFunction,
    pub read: GoFunction,
    pub handshake: GoFunction,
}

/// Reads and analyses the binary at `path`. Only the parts the analysis needs are read (the
/// headers, and for a Go program its build info, symbol or pcln table and three functions'
/// code): reading whole files made every new in-scope process cost its executable's size in
/// memory (a 40 MiB binary was a 40 MiB peak).
pub fn analyze_file(path: &Path) -> Result<GoTlsBinary, GoBinaryError> {
    let file = std::fs::File::open(path).map_err(|source| GoBinaryError::Io {
        path: path.display().to_string(),
        source,
    })?;
    analyze(&object::read::ReadCache::new(file))
}

/// Finds the probe points in an ELF image.
pub fn analyze<'data, R: ReadRef<'data>>(data: R) -> Result<GoTlsBinary, GoBinaryError> {
    let elf = object::File::parse(data).map_err(GoBinaryError::NotElf)?;
    let buildinfo = elf.section_by_name(".go.buildinfo");
    let pclntab = elf.section_by_name(".gopclntab");
    if buildinfo.is_none() && pclntab.is_none() {
        return Err(GoBinaryError::NotGo);
    }
    if elf.architecture() != Architecture::X86_64 {
        return Err(GoBinaryError::Architecture(elf.architecture()));
    }
    let go_version = match &buildinfo {
        Some(section) => {
            let bytes = section
                .data()
                .map_err(|_| malformed(".go.buildinfo section"))?;
            buildinfo_version(&elf, bytes)?
        }
        None => return Err(malformed(".go.buildinfo section (missing)")),
    };
    if !register_abi(&go_version) {
        return Err(GoBinaryError::UnsupportedVersion(go_version));
    }

    let (source, ranges) = match symtab_ranges(&elf) {
        Some(ranges) => (SymbolSource::Symtab, ranges),
        None => {
            let section = pclntab.ok_or(malformed(".gopclntab section (missing)"))?;
            let bytes = section
                .data()
                .map_err(|_| malformed(".gopclntab section"))?;
            (SymbolSource::Pclntab, pclntab_ranges(bytes)?)
        }
    };
    let function = |name: &'static str, range: Option<(u64, u64)>| {
        let (start, end) = range.ok_or(GoBinaryError::NoCryptoTls(name))?;
        locate(&elf, name, start, end)
    };
    Ok(GoTlsBinary {
        go_version,
        source,
        write: function(WRITE_SYMBOL, ranges.write)?,
        read: function(READ_SYMBOL, ranges.read)?,
        handshake: function(HANDSHAKE_SYMBOL, ranges.handshake)?,
    })
}

/// `[start, end)` virtual address ranges of the probed functions, where found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Ranges {
    write: Option<(u64, u64)>,
    read: Option<(u64, u64)>,
    handshake: Option<(u64, u64)>,
}

impl Ranges {
    fn record(&mut self, name: &[u8], range: (u64, u64)) {
        if name == WRITE_SYMBOL.as_bytes() {
            self.write = Some(range);
        } else if name == READ_SYMBOL.as_bytes() {
            self.read = Some(range);
        } else if name == HANDSHAKE_SYMBOL.as_bytes() {
            self.handshake = Some(range);
        }
    }
}

/// The ranges from `.symtab`, or None when the binary is stripped.
fn symtab_ranges<'data, R: ReadRef<'data>>(elf: &object::File<'data, R>) -> Option<Ranges> {
    let mut symbols = elf.symbols().peekable();
    symbols.peek()?;
    let mut ranges = Ranges::default();
    for symbol in symbols {
        if let Ok(name) = symbol.name_bytes()
            && symbol.size() > 0
        {
            ranges.record(name, (symbol.address(), symbol.address() + symbol.size()));
        }
    }
    Some(ranges)
}

/// The `.gopclntab` header fields we need, per layout (Go's runtime/symtab.go `pcHeader`).
#[derive(Debug)]
struct PclnHeader {
    /// Number of functions in the function table.
    nfunc: usize,
    /// Base of the function table's 32-bit entry offsets (Go 1.18+); 0 before that, where
    /// entries are absolute addresses.
    text_start: u64,
    funcname_offset: usize,
    /// Start of the function table (`pclnOffset`).
    functab_offset: usize,
    /// Go 1.18+: (entryoff u32, funcoff u32) pairs; before: (entry uintptr, funcoff uintptr).
    entries_are_offsets: bool,
}

const PCLN_MAGIC_GO116: u32 = 0xffff_fffa;
const PCLN_MAGIC_GO118: u32 = 0xffff_fff0;
const PCLN_MAGIC_GO120: u32 = 0xffff_fff1;

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn read_usize(bytes: &[u8], at: usize) -> Option<usize> {
    usize::try_from(read_u64(bytes, at)?).ok()
}

fn pcln_header(pclntab: &[u8]) -> Result<PclnHeader, GoBinaryError> {
    let magic = read_u32(pclntab, 0).ok_or(malformed(".gopclntab header"))?;
    // pad, pad, minLC (1 on x86), ptrSize (8 on amd64)
    if pclntab.get(4..8) != Some(&[0, 0, 1, 8]) {
        return Err(malformed(
            ".gopclntab header (expected amd64 instruction/pointer sizes)",
        ));
    }
    let word =
        |index: usize| read_usize(pclntab, 8 + 8 * index).ok_or(malformed(".gopclntab header"));
    match magic {
        PCLN_MAGIC_GO116 => Ok(PclnHeader {
            nfunc: word(0)?,
            text_start: 0,
            funcname_offset: word(2)?,
            functab_offset: word(6)?,
            entries_are_offsets: false,
        }),
        PCLN_MAGIC_GO118 | PCLN_MAGIC_GO120 => Ok(PclnHeader {
            nfunc: word(0)?,
            text_start: read_u64(pclntab, 8 + 8 * 2).ok_or(malformed(".gopclntab header"))?,
            funcname_offset: word(3)?,
            functab_offset: word(7)?,
            entries_are_offsets: true,
        }),
        other => Err(GoBinaryError::UnsupportedPclntab(other)),
    }
}

/// The ranges from the function table in `.gopclntab`: each function ends where the next one
/// starts (the table is sorted and closed by an end entry).
fn pclntab_ranges(pclntab: &[u8]) -> Result<Ranges, GoBinaryError> {
    let header = pcln_header(pclntab)?;
    let functab = pclntab
        .get(header.functab_offset..)
        .ok_or(malformed(".gopclntab function table offset"))?;
    let entry_size = if header.entries_are_offsets { 8 } else { 16 };
    // Bounds the loop by the table's real size before trusting nfunc.
    let table_len = header
        .nfunc
        .checked_add(1)
        .and_then(|n| n.checked_mul(entry_size))
        .ok_or(malformed(".gopclntab function count"))?;
    if table_len > functab.len() {
        return Err(malformed(".gopclntab function count"));
    }
    let entry = |index: usize| -> Option<(u64, usize)> {
        let at = index * entry_size;
        if header.entries_are_offsets {
            let pc = header.text_start + u64::from(read_u32(functab, at)?);
            Some((pc, read_u32(functab, at + 4)? as usize))
        } else {
            Some((read_u64(functab, at)?, read_usize(functab, at + 8)?))
        }
    };
    let names = pclntab
        .get(header.funcname_offset..)
        .ok_or(malformed(".gopclntab name table offset"))?;
    let mut ranges = Ranges::default();
    for index in 0..header.nfunc {
        let ((start, func_offset), (end, _)) = entry(index)
            .zip(entry(index + 1))
            .ok_or(malformed(".gopclntab function table"))?;
        // _func: entry (u32 offset in 1.18+, uintptr before), then nameOff (int32).
        let name_field = if header.entries_are_offsets { 4 } else { 8 };
        let name_offset = read_u32(functab, func_offset.saturating_add(name_field))
            .ok_or(malformed(".gopclntab function record"))? as usize;
        let name = names
            .get(name_offset..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .ok_or(malformed(".gopclntab function name"))?;
        if end < start {
            return Err(malformed(".gopclntab function table (unsorted)"));
        }
        ranges.record(name, (start, end));
    }
    Ok(ranges)
}

/// Turns a function's address range into file offsets of its entry and RET instructions.
fn locate<'data, R: ReadRef<'data>>(
    elf: &object::File<'data, R>,
    name: &'static str,
    start: u64,
    end: u64,
) -> Result<GoFunction, GoBinaryError> {
    let section = elf
        .sections()
        .find(|s| s.address() <= start && end <= s.address() + s.size())
        .ok_or(malformed("function address (outside every section)"))?;
    let (section_offset, _) = section
        .file_range()
        .ok_or(malformed("function section (no file data)"))?;
    let code = section
        .data_range(start, end - start)
        .ok()
        .flatten()
        .ok_or(malformed("function code range"))?;
    let file_offset = |address: u64| address - section.address() + section_offset;
    let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    let ret_offsets: Vec<u64> = decoder
        .iter()
        .filter(|instruction| instruction.mnemonic() == Mnemonic::Ret)
        .map(|instruction| file_offset(instruction.ip()))
        .collect();
    if ret_offsets.is_empty() {
        return Err(GoBinaryError::NoReturn { function: name });
    }
    Ok(GoFunction {
        name,
        address: start,
        entry_offset: file_offset(start),
        ret_offsets,
    })
}

/// Go version from `.go.buildinfo` (Go's debug/buildinfo): a 32-byte header
/// "\xff Go buildinf:" + pointer size + flags, then either (flag 2, Go 1.18+) the version as
/// a varint-length-prefixed string, or (before) a pointer to a Go string header.
fn buildinfo_version<'data, R: ReadRef<'data>>(
    elf: &object::File<'data, R>,
    section: &[u8],
) -> Result<String, GoBinaryError> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    const FLAG_INLINE_STRINGS: u8 = 2;
    const FLAG_BIG_ENDIAN: u8 = 1;
    let bad = || malformed(".go.buildinfo header");
    if !section.starts_with(MAGIC) || section.len() < 32 {
        return Err(bad());
    }
    let (pointer_size, flags) = (section[14], section[15]);
    if flags & FLAG_INLINE_STRINGS != 0 {
        return varint_string(&section[32..]).ok_or(bad());
    }
    if pointer_size != 8 || flags & FLAG_BIG_ENDIAN != 0 {
        return Err(bad());
    }
    // Pre-1.18: two pointers (version, modinfo) to string headers {data ptr, len}.
    let header_address = read_u64(section, 16).ok_or(bad())?;
    let header = read_virtual(elf, header_address, 16).ok_or(bad())?;
    let (data, len) = (
        read_u64(header, 0).ok_or(bad())?,
        read_u64(header, 8).ok_or(bad())?,
    );
    let text = read_virtual(elf, data, len.min(64)).ok_or(bad())?;
    Ok(String::from_utf8_lossy(text).into_owned())
}

fn varint_string(bytes: &[u8]) -> Option<String> {
    let (mut len, mut shift, mut used) = (0usize, 0u32, 0usize);
    for &byte in bytes.iter().take(4) {
        len |= usize::from(byte & 0x7f) << shift;
        used += 1;
        if byte & 0x80 == 0 {
            let text = bytes.get(used..used.checked_add(len)?)?;
            return String::from_utf8(text.to_vec()).ok();
        }
        shift += 7;
    }
    None
}

fn read_virtual<'data, R: ReadRef<'data>>(
    elf: &object::File<'data, R>,
    address: u64,
    len: u64,
) -> Option<&'data [u8]> {
    elf.sections()
        .find_map(|s| s.data_range(address, len).ok().flatten())
}

/// Go's register ABI on amd64 arrived in Go 1.17; "devel" builds are taken as current.
fn register_abi(version: &str) -> bool {
    let Some(rest) = version.strip_prefix("go") else {
        return version.starts_with("devel");
    };
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    major > 1 || (major == 1 && minor >= 17)
}

#[cfg(test)]
#[path = "golang_tests.rs"]
mod tests;
