//! The `groupnorm` command end to end: `.npy` files in, `.npy` files out, exit codes for bad input.

use groupnorm::Affine;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary: `GROUPNORM_BIN`, else cargo's build of it, else the one `gpu-pack` puts under
/// `.gpu/bin` (the GPU machine runs tests from the repository root without cargo).
fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GROUPNORM_BIN") {
        return p.into();
    }
    let cargo = PathBuf::from(env!("CARGO_BIN_EXE_groupnorm"));
    if cargo.exists() {
        return cargo;
    }
    let packed = PathBuf::from(".gpu/bin/bin-groupnorm");
    assert!(
        packed.exists(),
        "groupnorm binary not found: set GROUPNORM_BIN"
    );
    packed
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
        let p = std::env::temp_dir().join(format!("groupnorm-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, f: &str) -> String {
        self.0.join(f).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A version 1.0 float32 `.npy` file, written by hand as NumPy does.
fn write_f32(path: &str, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for v in data {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Reads a float32 `.npy` file written by the command: (shape, data).
fn read_f32(path: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let data = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, data)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn apply_reproduces_the_worked_example() {
    let t = TempDir::new("apply");
    let x = [5.0f32, 4., 7., 2., 1., 6., 2., 3., 4., 8., 1., 9.];
    write_f32(&t.path("x.npy"), &[3, 4], &x);
    write_f32(&t.path("w.npy"), &[4], &[1., 1., 2., 0.5]);
    write_f32(&t.path("b.npy"), &[4], &[0., 0., 1., -1.]);
    let o = run(&[
        "apply",
        "--x",
        &t.path("x.npy"),
        "--groups",
        "2",
        "--weight",
        &t.path("w.npy"),
        "--bias",
        &t.path("b.npy"),
        "--out",
        &t.path("y.npy"),
        "--mean",
        &t.path("m.npy"),
        "--rstd",
        &t.path("r.npy"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, y) = read_f32(&t.path("y.npy"));
    assert_eq!(shape, vec![3, 4]);
    let expected = [1., -1., 3., -1.5, -1., 1., -1., -0.5, -1., 1., -1., -0.5];
    for (g, e) in y.iter().zip(expected) {
        assert!((g - e).abs() < 1e-4, "got {g}, expected {e}");
    }
    let (mshape, mean) = read_f32(&t.path("m.npy"));
    assert_eq!(mshape, vec![3, 2]);
    assert_eq!(mean, vec![4.5, 4.5, 3.5, 2.5, 6.0, 5.0]);
    let (_, rstd) = read_f32(&t.path("r.npy"));
    assert!(
        (rstd[0] - 1.0 / (0.25f32 + 1e-5).sqrt()).abs() < 1e-3,
        "{rstd:?}"
    );
}

#[test]
fn nhwc_files_give_the_transposed_result() {
    let t = TempDir::new("nhwc");
    // (N, C, S) = (2, 4, 3) in NCHW, and the same values as (N, S, C) for NHWC
    let nchw: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 - 3.0).collect();
    let mut nhwc = vec![0.0; 24];
    for n in 0..2 {
        for c in 0..4 {
            for s in 0..3 {
                nhwc[(n * 3 + s) * 4 + c] = nchw[(n * 4 + c) * 3 + s];
            }
        }
    }
    write_f32(&t.path("a.npy"), &[2, 4, 3], &nchw);
    write_f32(&t.path("b.npy"), &[2, 3, 4], &nhwc);
    let o = run(&[
        "apply",
        "--x",
        &t.path("a.npy"),
        "--groups",
        "2",
        "--out",
        &t.path("ya.npy"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        "apply",
        "--x",
        &t.path("b.npy"),
        "--groups",
        "2",
        "--layout",
        "nhwc",
        "--out",
        &t.path("yb.npy"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, ya) = read_f32(&t.path("ya.npy"));
    let (shape, yb) = read_f32(&t.path("yb.npy"));
    assert_eq!(shape, vec![2, 3, 4]);
    for n in 0..2 {
        for c in 0..4 {
            for s in 0..3 {
                let (a, b) = (ya[(n * 4 + c) * 3 + s], yb[(n * 3 + s) * 4 + c]);
                assert!((a - b).abs() < 1e-6, "({n},{c},{s}): {a} vs {b}");
            }
        }
    }
}

#[test]
fn grad_matches_the_library() {
    let t = TempDir::new("grad");
    let x: Vec<f32> = (0..48).map(|i| ((i * 13) % 17) as f32 / 4.0).collect();
    let dy: Vec<f32> = (0..48).map(|i| ((i * 5) % 7) as f32 / 3.0 - 1.0).collect();
    let w: Vec<f32> = (0..6).map(|i| 0.5 + i as f32 / 6.0).collect();
    write_f32(&t.path("x.npy"), &[2, 6, 4], &x);
    write_f32(&t.path("dy.npy"), &[2, 6, 4], &dy);
    write_f32(&t.path("w.npy"), &[6], &w);
    let o = run(&[
        "grad",
        "--x",
        &t.path("x.npy"),
        "--dy",
        &t.path("dy.npy"),
        "--groups",
        "3",
        "--weight",
        &t.path("w.npy"),
        "--dx",
        &t.path("dx.npy"),
        "--dweight",
        &t.path("dw.npy"),
        "--dbias",
        &t.path("db.npy"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let gn = groupnorm::GroupNorm::new(3, 6).unwrap();
    let (_, stats) = gn
        .forward(&x, &[2, 6, 4], Affine::new().weight(&w))
        .unwrap();
    let g = gn
        .backward(&dy, &x, &[2, 6, 4], &stats, Affine::new().weight(&w), true)
        .unwrap();
    assert_eq!(read_f32(&t.path("dx.npy")).1, g.dx);
    assert_eq!(read_f32(&t.path("dw.npy")), (vec![6], g.dweight.unwrap()));
    assert_eq!(read_f32(&t.path("db.npy")), (vec![6], g.dbias.unwrap()));
}

#[test]
fn bad_input_is_one_line_exit_2_and_no_output() {
    let t = TempDir::new("bad");
    write_f32(&t.path("x.npy"), &[2, 6, 4], &[0.5; 48]);
    write_f32(&t.path("w5.npy"), &[5], &[1.0; 5]);
    std::fs::write(t.path("junk.npy"), b"not numpy").unwrap();
    let out = t.path("y.npy");
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "apply",
                "--x",
                &t.path("missing.npy"),
                "--groups",
                "2",
                "--out",
                &out,
            ],
            "cannot read",
        ),
        (
            &[
                "apply",
                "--x",
                &t.path("junk.npy"),
                "--groups",
                "2",
                "--out",
                &out,
            ],
            "bad magic",
        ),
        (
            &[
                "apply",
                "--x",
                &t.path("x.npy"),
                "--groups",
                "4",
                "--out",
                &out,
            ],
            "divisible",
        ),
        (
            &[
                "apply",
                "--x",
                &t.path("x.npy"),
                "--groups",
                "0",
                "--out",
                &out,
            ],
            "groups",
        ),
        (
            &[
                "apply",
                "--x",
                &t.path("x.npy"),
                "--groups",
                "2",
                "--weight",
                &t.path("w5.npy"),
                "--out",
                &out,
            ],
            "expected (6,)",
        ),
        (
            &["apply", "--x", &t.path("x.npy"), "--groups", "2"],
            "--out is required",
        ),
        (
            &[
                "apply",
                "--x",
                &t.path("x.npy"),
                "--groups",
                "2",
                "--out",
                &out,
                "--eps",
                "-1",
            ],
            "eps",
        ),
        (
            &[
                "apply",
                "--x",
                &t.path("x.npy"),
                "--groups",
                "2",
                "--out",
                &out,
                "--frobnicate",
                "1",
            ],
            "unknown flag",
        ),
        (
            &[
                "apply",
                "--x",
                &t.path("x.npy"),
                "--groups",
                "2",
                "--out",
                &out,
                "--layout",
                "nwch",
            ],
            "--layout",
        ),
        (
            &[
                "grad",
                "--x",
                &t.path("x.npy"),
                "--dy",
                &t.path("w5.npy"),
                "--groups",
                "2",
                "--dx",
                &out,
            ],
            "must match",
        ),
        (
            &[
                "grad",
                "--x",
                &t.path("x.npy"),
                "--dy",
                &t.path("x.npy"),
                "--groups",
                "2",
                "--dx",
                &out,
                "--dweight",
                &out,
            ],
            "--dweight needs --weight",
        ),
        (&["frobnicate"], "unknown command"),
    ];
    for (args, needle) in cases {
        let o = run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: `{err}` lacks `{needle}`");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(!Path::new(&out).exists(), "{args:?} left {out} behind");
    }
}

#[test]
fn command_line_errors_are_one_line_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["demo", "--foo"], "--foo"),
        (&["info", "extra"], "extra"),
        (&["--frobnicate"], "--frobnicate"),
        (&["bench", "--frobnicate"], "unknown flag --frobnicate"),
    ];
    for (args, needle) in cases {
        let o = run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: `{err}` lacks `{needle}`");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn version_and_help_succeed() {
    let o = run(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    for args in [
        &["--help"][..],
        &["help"],
        &["apply", "--help"],
        &["bench", "-h"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(out.to_lowercase().contains("usage"), "{args:?}: {out}");
    }
}

#[cfg(unix)]
#[test]
fn a_non_utf8_argument_is_a_clean_error() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let t = TempDir::new("nonutf8");
    let out = t.path("y.npy");
    let bad = OsStr::from_bytes(b"x\xff.npy");
    let o = Command::new(bin())
        .args(["apply", "--groups", "2", "--out", &out, "--x"])
        .arg(bad)
        .output()
        .expect("run groupnorm");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("not valid UTF-8"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!Path::new(&out).exists());
    // a non-UTF-8 command name too
    let o = Command::new(bin())
        .arg(bad)
        .output()
        .expect("run groupnorm");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
}
