//! NumPy `.npy` files: little-endian float32, float16 and float64 arrays in C order, versions
//! 1.0-3.0.
//!
//! Outputs are written to a temporary file beside the target and renamed into place, so a failed
//! run leaves no partial file behind.

use super::args::UsageError;
use groupnorm::f16;
use std::io::Write;
use std::path::Path;

/// An array read from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// `<f4`
    F32 { shape: Vec<usize>, data: Vec<f32> },
    /// `<f2`
    F16 { shape: Vec<usize>, data: Vec<f16> },
    /// `<f8` (NumPy's default float; computed on the CPU in f64)
    F64 { shape: Vec<usize>, data: Vec<f64> },
}

impl Array {
    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Array::F32 { shape, .. } | Array::F16 { shape, .. } | Array::F64 { shape, .. } => shape,
        }
    }

    /// NumPy's name of the element type.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Array::F32 { .. } => "float32",
            Array::F16 { .. } => "float16",
            Array::F64 { .. } => "float64",
        }
    }
}

const MAGIC: &[u8] = b"\x93NUMPY";

fn err(path: &Path, what: impl std::fmt::Display) -> UsageError {
    UsageError(printable(&format!("{}: {what}", path.display())))
}

/// Reads a `.npy` file.
pub fn read(path: &Path) -> Result<Array, UsageError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    parse(&bytes).map_err(|what| err(path, what))
}

/// Parses the bytes of a `.npy` file (versions 1.0, 2.0 and 3.0); an error is one line of text.
pub fn parse(bytes: &[u8]) -> Result<Array, String> {
    parse_raw(bytes).map_err(|e| printable(&e))
}

fn parse_raw(bytes: &[u8]) -> Result<Array, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or("truncated header")?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not text")?;
    let descr = field(header, "descr").ok_or("header has no 'descr'")?;
    let fortran = field(header, "fortran_order").ok_or("header has no 'fortran_order'")?;
    if fortran.trim() != "False" {
        return Err(
            "Fortran-ordered arrays are not supported: save with np.ascontiguousarray".into(),
        );
    }
    let shape = parse_shape(field(header, "shape").ok_or("header has no 'shape'")?)?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    let data = &bytes[end..];
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let elem = match descr {
        "<f4" | "=f4" => 4,
        "<f2" | "=f2" => 2,
        "<f8" | "=f8" => 8,
        other => {
            return Err(format!(
                "unsupported dtype '{other}': groupnorm reads float32 ('<f4'), float16 ('<f2') \
                 and float64 ('<f8')"
            ))
        }
    };
    let need = count.checked_mul(elem).ok_or("shape overflows")?;
    if data.len() != need {
        return Err(format!(
            "holds {} data bytes, but shape {shape:?} of {descr} needs {need}",
            data.len()
        ));
    }
    Ok(if elem == 8 {
        Array::F64 {
            shape,
            data: data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunks")))
                .collect(),
        }
    } else if elem == 4 {
        Array::F32 {
            shape,
            data: data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    } else {
        Array::F16 {
            shape,
            data: data
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        }
    })
}

/// The text of `'key': value` in a header dict, up to the next top-level comma or brace.
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, ch) in rest.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return Some(&rest[..=i]);
                }
            }
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("bad shape {s}"))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().map_err(|_| format!("bad shape {s}")))
        .collect()
}

/// Serializes an array as a `.npy` file: version 1.0, or 2.0 when the header does not fit the
/// 16-bit length of 1.0 (NumPy's own rule), so headers of any length are written whole.
pub fn to_bytes(array: &Array) -> Vec<u8> {
    let (descr, shape) = match array {
        Array::F32 { shape, .. } => ("<f4", shape),
        Array::F16 { shape, .. } => ("<f2", shape),
        Array::F64 { shape, .. } => ("<f8", shape),
    };
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let body = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // magic + version + length field, then the header padded with spaces and ended by '\n' so
    // that the data starts at a multiple of 64
    let padded = |preamble: usize| {
        let unpadded = preamble + body.len() + 1;
        body.len() + (64 - unpadded % 64) % 64 + 1
    };
    let (version, preamble) = if padded(MAGIC.len() + 4) <= u16::MAX as usize {
        (1u8, MAGIC.len() + 4)
    } else {
        (2u8, MAGIC.len() + 6)
    };
    let header_len = padded(preamble);
    let mut header = body.clone();
    header.push_str(&" ".repeat(header_len - body.len() - 1));
    header.push('\n');
    let (elem, count) = match array {
        Array::F32 { data, .. } => (4, data.len()),
        Array::F16 { data, .. } => (2, data.len()),
        Array::F64 { data, .. } => (8, data.len()),
    };
    let mut out = Vec::with_capacity(preamble + header.len() + elem * count);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        // a header of 4 GiB would need a shape of a billion dims: the data could not exist
        let len = u32::try_from(header.len()).expect("a .npy header under 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    match array {
        Array::F32 { data, .. } => data.iter().for_each(|v| out.extend(v.to_le_bytes())),
        Array::F16 { data, .. } => data
            .iter()
            .for_each(|v| out.extend(v.to_bits().to_le_bytes())),
        Array::F64 { data, .. } => data.iter().for_each(|v| out.extend(v.to_le_bytes())),
    }
    out
}

/// `text` with every control character (newline, tab, escape...) written as an escape, so that a
/// message quoting a file's header or a path stays on one line of stderr.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The path a target names once its directory is resolved (symbolic links and `..` included),
/// so that two spellings of one file compare equal.
fn resolved(path: &Path) -> Result<std::path::PathBuf, UsageError> {
    if let Ok(p) = path.canonicalize() {
        return Ok(p);
    }
    let name = path
        .file_name()
        .ok_or_else(|| err(path, "cannot write: not a file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| err(path, format!("cannot write: its directory: {e}")))?;
    Ok(dir.join(name))
}

/// Checks the targets of one run before anything is computed or written: each a file name in an
/// existing directory, not a directory itself, and no file named for two outputs.
pub fn check_targets(paths: &[&Path]) -> Result<(), UsageError> {
    let mut seen: Vec<std::path::PathBuf> = Vec::with_capacity(paths.len());
    for path in paths {
        if path.is_dir() {
            return Err(err(path, "cannot write: it is a directory"));
        }
        let r = resolved(path)?;
        if seen.contains(&r) {
            return Err(err(
                path,
                "is named for two outputs: each output needs its own file",
            ));
        }
        seen.push(r);
    }
    Ok(())
}

/// A file name beside `path`, unique to this process and to output `index`.
fn sibling(path: &Path, index: usize, what: &str) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.groupnorm-{}-{index}.{what}",
        std::process::id()
    ))
}

/// Writes several arrays, all or none: each goes to its own temporary file beside its target;
/// only once every one is written are they renamed into place, and should a rename fail, the ones
/// already renamed are undone (a replaced file is restored from a hard link kept until the end),
/// so an input named as an output survives any failure.
pub fn write_all(outputs: &[(&Path, Array)]) -> Result<(), UsageError> {
    write_all_with(outputs, &|from, to| std::fs::rename(from, to))
}

/// [`write_all`] with the rename into place given (a test makes it fail part way).
fn write_all_with(
    outputs: &[(&Path, Array)],
    rename: &dyn Fn(&Path, &Path) -> std::io::Result<()>,
) -> Result<(), UsageError> {
    let paths: Vec<&Path> = outputs.iter().map(|(p, _)| *p).collect();
    check_targets(&paths)?;
    let mut temps = Vec::new();
    let mut backups: Vec<Option<std::path::PathBuf>> = Vec::new();
    let mut renamed = 0;
    let result = (|| {
        for (i, (path, array)) in outputs.iter().enumerate() {
            let tmp = sibling(path, i, "tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| err(path, format!("cannot create: {e}")))?;
            temps.push(tmp);
            f.write_all(&to_bytes(array))
                .and_then(|_| f.sync_all())
                .map_err(|e| err(path, format!("cannot write: {e}")))?;
        }
        for (i, path) in paths.iter().enumerate() {
            let backup = if std::fs::symlink_metadata(path).is_ok() {
                let b = sibling(path, i, "old");
                std::fs::hard_link(path, &b)
                    .or_else(|_| std::fs::copy(path, &b).map(drop))
                    .map_err(|e| err(path, format!("cannot keep the old file: {e}")))?;
                Some(b)
            } else {
                None
            };
            backups.push(backup);
        }
        for (path, tmp) in paths.iter().zip(&temps) {
            rename(tmp, path).map_err(|e| err(path, format!("cannot rename: {e}")))?;
            renamed += 1;
        }
        Ok(())
    })();
    if result.is_err() {
        for (path, backup) in paths.iter().zip(&backups).take(renamed) {
            let _ = match backup {
                Some(b) => std::fs::rename(b, path),
                None => std::fs::remove_file(path),
            };
        }
    }
    for f in temps.iter().chain(backups.iter().flatten()) {
        let _ = std::fs::remove_file(f);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_numpy_headers() {
        let a = Array::F32 {
            shape: vec![2, 3],
            data: vec![1.0, -2.5, 3.0, 0.0, f32::INFINITY, 7.25],
        };
        let bytes = to_bytes(&a);
        assert_eq!(
            (10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64,
            0
        );
        assert_eq!(parse(&bytes).unwrap(), a);
        let h = Array::F16 {
            shape: vec![4],
            data: vec![f16::from_f32(0.5); 4],
        };
        assert_eq!(parse(&to_bytes(&h)).unwrap(), h);
        // a header as numpy writes it, 0-d shape and all
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        let hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (), }          \n";
        b.extend((hdr.len() as u16).to_le_bytes());
        b.extend(hdr.as_bytes());
        b.extend(1.5f32.to_le_bytes());
        assert_eq!(
            parse(&b).unwrap(),
            Array::F32 {
                shape: vec![],
                data: vec![1.5]
            }
        );
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let mut int_file = to_bytes(&Array::F32 {
            shape: vec![1],
            data: vec![0.0],
        });
        let at = int_file.windows(3).position(|w| w == b"<f4").unwrap();
        int_file[at + 1] = b'i';
        let e = parse(&int_file).unwrap_err();
        assert!(e.contains("unsupported dtype '<i4'"), "{e}");
        // float64 (np.save's default) round-trips
        let a = Array::F64 {
            shape: vec![2, 1],
            data: vec![0.1, -1e300],
        };
        assert_eq!(parse(&to_bytes(&a)).unwrap(), a);
        let mut short = to_bytes(&Array::F32 {
            shape: vec![3],
            data: vec![0.0; 3],
        });
        short.pop();
        assert!(parse(&short).unwrap_err().contains("data bytes"));
        assert!(parse(b"garbage").is_err());
    }

    #[test]
    fn long_headers_are_version_2_and_read_back() {
        for dims in [21_000, 21_900, 22_000, 30_000] {
            let a = Array::F16 {
                shape: vec![1; dims],
                data: vec![f16::from_f32(2.0)],
            };
            let bytes = to_bytes(&a);
            let (version, start, len) = if bytes[6] == 1 {
                (1, 10, u16::from_le_bytes([bytes[8], bytes[9]]) as usize)
            } else {
                let l = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
                (bytes[6], 12, l as usize)
            };
            assert_eq!(version, if start + len > 65_535 + 10 { 2 } else { 1 });
            assert_eq!((start + len) % 64, 0, "{dims} dims");
            assert_eq!(bytes.len(), start + len + 2, "{dims} dims");
            assert_eq!(parse(&bytes).unwrap(), a, "{dims} dims");
        }
    }

    #[test]
    fn errors_quoting_the_header_are_one_line() {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        let hdr = "{'descr': '<f\n4\t\x1b', 'fortran_order': False, 'shape': (1,), }\n";
        b.extend((hdr.len() as u16).to_le_bytes());
        b.extend(hdr.as_bytes());
        let e = parse(&b).unwrap_err();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.contains(r"'<f\n4\t\u{1b}'"), "{e}");
    }

    /// A rename that fails part way: the outputs already renamed are undone, the file an output
    /// replaced is back, byte for byte, and no temporary or backup is left.
    #[test]
    fn a_failed_rename_undoes_the_ones_before_it() {
        let dir = std::env::temp_dir().join(format!("groupnorm-npy-undo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = (dir.join("a.npy"), dir.join("b.npy"), dir.join("c.npy"));
        std::fs::write(&a, b"the input").unwrap();
        let arr = |v: f32| Array::F32 {
            shape: vec![1],
            data: vec![v],
        };
        let outputs = [
            (a.as_path(), arr(1.0)),
            (b.as_path(), arr(2.0)),
            (c.as_path(), arr(3.0)),
        ];
        let calls = std::cell::Cell::new(0);
        let flaky = |from: &Path, to: &Path| {
            calls.set(calls.get() + 1);
            if calls.get() == 3 {
                Err(std::io::Error::other("disk on fire"))
            } else {
                std::fs::rename(from, to)
            }
        };
        let e = write_all_with(&outputs, &flaky).unwrap_err();
        assert!(
            e.0.contains("c.npy: cannot rename: disk on fire"),
            "{}",
            e.0
        );
        assert_eq!(std::fs::read(&a).unwrap(), b"the input");
        assert!(!b.exists(), "a new output was left behind");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["a.npy"], "temporaries or backups left");
        // and without the failure all three are written
        write_all(&outputs).unwrap();
        assert_eq!(parse(&std::fs::read(&a).unwrap()).unwrap(), arr(1.0));
        assert_eq!(parse(&std::fs::read(&c).unwrap()).unwrap(), arr(3.0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
