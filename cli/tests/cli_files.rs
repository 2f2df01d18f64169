//! The `groupnorm apply`/`grad` file contract: every output of a run is written whole or not at
//! all, an input named as an output survives any failure, headers of any length are written
//! whole, and every error is one line on stderr with exit code 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GROUPNORM_BIN") {
        return p.into();
    }
    PathBuf::from(env!("CARGO_BIN_EXE_groupnorm"))
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run groupnorm")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("groupnorm-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, f: &str) -> String {
        self.0.join(f).to_string_lossy().into_owned()
    }
    /// The names in the directory, sorted (temporaries and backups included).
    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A float32 `.npy` file with the given header text (padded and ended as NumPy does) in the given
/// format version (1, 2 or 3).
fn npy_bytes(version: u8, header_body: &str, data: &[f32]) -> Vec<u8> {
    let preamble = if version == 1 { 10 } else { 12 };
    let mut header = header_body.to_string();
    while (preamble + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY".to_vec();
    bytes.extend([version, 0]);
    if version == 1 {
        bytes.extend(u16::try_from(header.len()).unwrap().to_le_bytes());
    } else {
        bytes.extend(u32::try_from(header.len()).unwrap().to_le_bytes());
    }
    bytes.extend(header.as_bytes());
    for v in data {
        bytes.extend(v.to_le_bytes());
    }
    bytes
}

fn shape_text(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    }
}

fn write_f32(path: &str, version: u8, shape: &[usize], data: &[f32]) {
    let body = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': {}, }}",
        shape_text(shape)
    );
    std::fs::write(path, npy_bytes(version, &body, data)).unwrap();
}

/// Reads a float32 `.npy` file of any version strictly: (version, shape, data). Panics on any
/// inconsistency (a truncated header length included), which is the point.
fn read_f32(path: &str) -> (u8, Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{path}: magic");
    let version = bytes[6];
    let (hlen, start) = match version {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => panic!("{path}: version {v}"),
    };
    assert_eq!((start + hlen) % 64, 0, "{path}: data not 64-byte aligned");
    let header = std::str::from_utf8(&bytes[start..start + hlen]).unwrap();
    assert!(
        header.ends_with('\n'),
        "{path}: header not ended by a newline"
    );
    assert!(
        header.starts_with("{'descr': '<f4'"),
        "{path}: {header:.80}"
    );
    let inner = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{path}: data");
    (version, shape, data)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 2 with exactly one line on stderr containing `needle`.
fn assert_refused(o: &Output, needle: &str, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{what}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: not one line: {err:?}"
    );
    assert!(err.contains(needle), "{what}: `{err}` lacks `{needle}`");
}

// x: (2, 4, 3), 2 groups
const SHAPE: [usize; 3] = [2, 4, 3];

fn x_data() -> Vec<f32> {
    (0..24).map(|i| ((i * 7) % 11) as f32 * 0.5 - 2.0).collect()
}

#[test]
fn each_output_gets_its_own_temporary() {
    let t = TempDir::new("distinct");
    let x = t.path("x.npy");
    write_f32(&x, 1, &SHAPE, &x_data());
    // y.npy and y.bin: one temporary name for both before (`with_extension`), so y.npy got the
    // mean and the run failed
    let (y, mean, rstd) = (t.path("y.npy"), t.path("y.bin"), t.path("y"));
    let o = run(&[
        "apply", "--x", &x, "--groups", "2", "--out", &y, "--mean", &mean, "--rstd", &rstd,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(read_f32(&y).1, SHAPE);
    assert_eq!(read_f32(&mean).1, [2, 2]);
    assert_eq!(read_f32(&rstd).1, [2, 2]);
    // the same result as a run with one output at a time
    let y1 = t.path("y1.npy");
    let o = run(&["apply", "--x", &x, "--groups", "2", "--out", &y1]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(read_f32(&y).2, read_f32(&y1).2);
    assert_eq!(
        t.listing(),
        ["x.npy", "y", "y.bin", "y.npy", "y1.npy"],
        "temporaries left behind"
    );
}

#[test]
fn one_file_named_for_two_outputs_is_refused() {
    let t = TempDir::new("twice");
    let x = t.path("x.npy");
    write_f32(&x, 1, &SHAPE, &x_data());
    let y = t.path("y.npy");
    let other_spelling = format!(
        "{}/../{}/y.npy",
        t.0.display(),
        t.0.file_name().unwrap().to_string_lossy()
    );
    for extra in [["--mean", y.as_str()], ["--rstd", other_spelling.as_str()]] {
        let mut args = vec!["apply", "--x", &x, "--groups", "2", "--out", &y];
        args.extend(extra);
        assert_refused(&run(&args), "two outputs", &format!("{extra:?}"));
        assert!(!Path::new(&y).exists(), "{extra:?} left {y}");
    }
    let o = run(&[
        "grad",
        "--x",
        &x,
        "--dy",
        &x,
        "--groups",
        "2",
        "--weight",
        &t.path("w.npy"),
        "--dx",
        &y,
        "--dweight",
        &y,
    ]);
    assert_refused(&o, "two outputs", "grad --dx y --dweight y");
    assert_eq!(t.listing(), ["x.npy"]);
}

#[test]
fn an_input_named_as_output_survives_a_failed_run() {
    let t = TempDir::new("input");
    let x = t.path("x.npy");
    write_f32(&x, 1, &SHAPE, &x_data());
    let before = std::fs::read(&x).unwrap();
    let dir = t.path("adir");
    std::fs::create_dir(&dir).unwrap();
    // before: y was renamed over x, then the rename onto the directory failed: x was lost
    let o = run(&[
        "apply", "--x", &x, "--groups", "2", "--out", &x, "--rstd", &dir,
    ]);
    assert_refused(&o, "directory", "--out x --rstd <dir>");
    assert_eq!(std::fs::read(&x).unwrap(), before, "the input was replaced");
    // an existing output is left as it was too
    let y = t.path("y.npy");
    std::fs::write(&y, b"precious").unwrap();
    let o = run(&[
        "apply", "--x", &x, "--groups", "2", "--out", &y, "--mean", &dir,
    ]);
    assert_refused(&o, "directory", "--out y --mean <dir>");
    assert_eq!(std::fs::read(&y).unwrap(), b"precious");
    // a failure in the computation (groups that do not divide C) leaves the input too
    let o = run(&["apply", "--x", &x, "--groups", "3", "--out", &x]);
    assert_refused(&o, "divisible", "--groups 3 --out x");
    assert_eq!(std::fs::read(&x).unwrap(), before);
    // and a run that succeeds replaces it, as asked
    let o = run(&["apply", "--x", &x, "--groups", "2", "--out", &x]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (_, shape, y) = read_f32(&x);
    assert_eq!(shape, SHAPE);
    assert_ne!(std::fs::read(&x).unwrap(), before);
    // each group of y has mean ~0
    for g in y.chunks(6) {
        assert!(g.iter().sum::<f32>().abs() < 1e-4, "{g:?}");
    }
    assert_eq!(
        t.listing(),
        ["adir", "x.npy", "y.npy"],
        "temporaries left behind"
    );
}

#[test]
fn headers_past_64_kib_are_written_whole_in_version_2() {
    let t = TempDir::new("long");
    // (1, 2, 1, 1, ..., 1): 22,000 dims make a header of ~66 KB, past the 16-bit length of
    // version 1.0 (before: written with the length truncated to 16 bits, exit 0)
    let mut shape = vec![1usize, 2];
    shape.extend(std::iter::repeat_n(1, 21_998));
    let x = t.path("x.npy");
    write_f32(&x, 2, &shape, &[1.0, 3.0]);
    let y = t.path("y.npy");
    let o = run(&["apply", "--x", &x, "--groups", "1", "--out", &y]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (version, got_shape, data) = read_f32(&y);
    assert_eq!(version, 2);
    assert_eq!(got_shape, shape);
    // one group of {1, 3}: mean 2, variance 1
    let r = 1.0 / (1.0f32 + 1e-5).sqrt();
    assert!(
        (data[0] + r).abs() < 1e-6 && (data[1] - r).abs() < 1e-6,
        "{data:?}"
    );
    // and the command reads its own output back
    let y2 = t.path("y2.npy");
    let o = run(&["apply", "--x", &y, "--groups", "1", "--out", &y2]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // a short header is still written as version 1.0
    let x1 = t.path("x1.npy");
    write_f32(&x1, 1, &SHAPE, &x_data());
    let o = run(&["apply", "--x", &x1, "--groups", "2", "--out", &y2]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(read_f32(&y2).0, 1);
}

#[test]
fn versions_1_2_and_3_are_read() {
    let t = TempDir::new("versions");
    let mut results = Vec::new();
    for version in [1u8, 2, 3] {
        let x = t.path(&format!("x{version}.npy"));
        write_f32(&x, version, &SHAPE, &x_data());
        let y = t.path(&format!("y{version}.npy"));
        let o = run(&["apply", "--x", &x, "--groups", "2", "--out", &y]);
        assert_eq!(o.status.code(), Some(0), "v{version}: {}", stderr(&o));
        results.push(read_f32(&y).2);
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
    let x = t.path("x4.npy");
    write_f32(&x, 4, &SHAPE, &x_data());
    let o = run(&[
        "apply",
        "--x",
        &x,
        "--groups",
        "2",
        "--out",
        &t.path("y4.npy"),
    ]);
    assert_refused(&o, "version 4", "version 4");
}

#[test]
fn control_characters_in_a_header_stay_on_one_line() {
    let t = TempDir::new("ctrl");
    let y = t.path("y.npy");
    let cases = [
        (
            "{'descr': '<f\n8', 'fortran_order': False, 'shape': (2, 2), }",
            "dtype",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,\n2x), }",
            "bad shape",
        ),
        (
            "{'descr': '<f4\r\n\x1b[31m', 'fortran_order': False, 'shape': (2, 2), }",
            "dtype",
        ),
        (
            "{'descr': '<f4', 'fortran_order': Fal\nse, 'shape': (2, 2), }",
            "Fortran",
        ),
    ];
    for (i, (header, needle)) in cases.iter().enumerate() {
        let x = t.path(&format!("x{i}.npy"));
        std::fs::write(&x, npy_bytes(1, header, &[0.0; 4])).unwrap();
        let o = run(&["apply", "--x", &x, "--groups", "1", "--out", &y]);
        assert_refused(&o, needle, &format!("{header:?}"));
        assert!(
            !stderr(&o).contains('\x1b'),
            "{header:?}: escape passed through"
        );
        assert!(!Path::new(&y).exists());
    }
    // a path with a newline in it, too
    let x = t.path("bad\nname.npy");
    std::fs::write(&x, b"not numpy").unwrap();
    let o = run(&["apply", "--x", &x, "--groups", "1", "--out", &y]);
    assert_refused(&o, "bad magic", "newline in the path");
}
