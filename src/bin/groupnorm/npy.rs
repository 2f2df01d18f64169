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
    UsageError(format!("{}: {what}", path.display()))
}

/// Reads a `.npy` file.
pub fn read(path: &Path) -> Result<Array, UsageError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    parse(&bytes).map_err(|what| err(path, what))
}

/// Parses the bytes of a `.npy` file.
pub fn parse(bytes: &[u8]) -> Result<Array, String> {
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

/// Serializes an array as a version 1.0 `.npy` file.
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
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // pad with spaces so that magic + version + length + header + '\n' is a multiple of 64
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
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

/// Writes several arrays, each to a temporary file first; renames them into place only once
/// every one was written, so an error leaves none of them behind.
pub fn write_all(outputs: &[(&Path, Array)]) -> Result<(), UsageError> {
    let mut temps = Vec::new();
    let result = (|| {
        for (path, array) in outputs {
            let tmp = path.with_extension(format!("npy.tmp{}", std::process::id()));
            temps.push(tmp.clone());
            let mut f = std::fs::File::create(&tmp)
                .map_err(|e| err(path, format!("cannot create: {e}")))?;
            f.write_all(&to_bytes(array))
                .and_then(|_| f.sync_all())
                .map_err(|e| err(path, format!("cannot write: {e}")))?;
        }
        for ((path, _), tmp) in outputs.iter().zip(&temps) {
            std::fs::rename(tmp, path).map_err(|e| err(path, format!("cannot rename: {e}")))?;
        }
        Ok(())
    })();
    if result.is_err() {
        for tmp in &temps {
            let _ = std::fs::remove_file(tmp);
        }
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
}
