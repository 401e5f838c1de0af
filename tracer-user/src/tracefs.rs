//! tracefs: where it is mounted, and whether a tracepoint's record layout is the one the probes
//! were compiled against (tracepoint formats are stable ABI, but a mismatch must be an error,
//! never garbage read at the wrong offset).

use std::path::{Path, PathBuf};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted (looked in {CANDIDATES:?}); mount it with \
         `mount -t tracefs tracefs /sys/kernel/tracing` (scripts/setup.sh does)"
    )]
    NotMounted,
    #[error("tracepoint {0} does not exist on this kernel ({1})")]
    NoTracepoint(String, String),
    #[error("tracepoint {tracepoint}: field {field} is {found}, the probe expects {expected}")]
    Layout {
        tracepoint: String,
        field: String,
        found: String,
        expected: String,
    },
}

pub fn mount_point() -> Result<PathBuf, TracefsError> {
    CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
        .map(Path::to_path_buf)
        .ok_or(TracefsError::NotMounted)
}

/// Checks that `category/name` has each `(field, offset, size)`.
pub fn verify_layout(
    category: &str,
    name: &str,
    fields: &[(&str, usize, usize)],
) -> Result<(), TracefsError> {
    let tracepoint = format!("{category}:{name}");
    let path = mount_point()?
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let format = std::fs::read_to_string(&path)
        .map_err(|e| TracefsError::NoTracepoint(tracepoint.clone(), e.to_string()))?;
    for &(field, offset, size) in fields {
        let expected = format!("offset {offset} size {size}");
        let found = parse_field(&format, field).map_or_else(
            || "missing".to_string(),
            |(o, s)| format!("offset {o} size {s}"),
        );
        if found != expected {
            return Err(TracefsError::Layout {
                tracepoint,
                field: field.into(),
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// Finds `field:<type> <name>[..];\toffset:N;\tsize:M;` in a tracepoint format file.
fn parse_field(format: &str, field: &str) -> Option<(usize, usize)> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let mut parts = decl.split(';').map(str::trim);
        let name = parts.next()?.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        let offset = parts.next()?.strip_prefix("offset:")?.parse().ok()?;
        let size = parts.next()?.strip_prefix("size:")?.parse().ok()?;
        Some((offset, size))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state\nformat:\n\
        \tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
        \tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n";

    #[test]
    fn parses_pointer_and_array_fields() {
        assert_eq!(parse_field(FORMAT, "skaddr"), Some((8, 8)));
        assert_eq!(parse_field(FORMAT, "saddr_v6"), Some((40, 16)));
        assert_eq!(parse_field(FORMAT, "saddr"), None);
    }
}
