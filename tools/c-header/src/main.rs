//! Generates the C header `capi/include/groupnorm.h` from the C ABI crate (`capi/src/lib.rs`)
//! with cbindgen's library and `capi/cbindgen.toml`, or verifies that the committed header is
//! what cbindgen writes.
//!
//! ```text
//! cargo run --release -p c-header              # regenerate capi/include/groupnorm.h
//! cargo run --release -p c-header -- --verify  # CI: exit 1 with a diff if it would change
//! ```
//!
//! The output is byte for byte that of the pinned cbindgen command
//! (`RUSTUP_TOOLCHAIN=nightly cbindgen --config capi/cbindgen.toml --crate groupnorm-capi
//! --output capi/include/groupnorm.h`, run from the workspace root): the same library does the
//! work. cbindgen reads `groupnorm_problem_t` from the macro-expanded crate
//! (`cargo rustc -- -Zunpretty=expanded`), which needs a nightly toolchain, so the tool runs
//! cbindgen's cargo calls with `RUSTUP_TOOLCHAIN=nightly` (override it with `C_HEADER_TOOLCHAIN`)
//! and the expansion's build in `target/cbindgen` (override it with `CARGO_EXPAND_TARGET_DIR`).
//!
//! Exit status: 0 when the header is (or now is) up to date; 1 when `--verify` finds it differs
//! (the file is then left untouched); 2 for a usage error or when cbindgen fails.

use std::env;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// The crate whose C ABI the header declares.
const CRATE: &str = "groupnorm-capi";
/// cbindgen's configuration, relative to the workspace root.
const CONFIG: &str = "capi/cbindgen.toml";
/// The header, relative to the workspace root.
const HEADER: &str = "capi/include/groupnorm.h";
/// Lines of unchanged context around each change in the diff `--verify` prints.
const CONTEXT: usize = 3;

fn main() -> ExitCode {
    let mut verify = false;
    let mut warnings = false;
    for arg in env::args().skip(1) {
        match arg.as_str() {
            "--verify" => verify = true,
            "--warnings" => warnings = true,
            "-h" | "--help" => {
                println!(
                    "usage: cargo run --release -p c-header [-- [--verify] [--warnings]]\n\n\
                     Writes {HEADER} with cbindgen from {CONFIG} and the {CRATE} crate;\n\
                     with --verify, writes nothing and exits 1 (with a diff) if it would change.\n\
                     --warnings prints what cbindgen skipped (expected: the enums' newtypes,\n\
                     which the config writes as C enums; private items)."
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("c-header: unknown argument `{other}` (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    match run(verify, warnings) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("c-header: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(verify: bool, warnings: bool) -> Result<ExitCode, String> {
    // tools/c-header -> the workspace root, wherever the tool is started from
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root
        .canonicalize()
        .map_err(|e| format!("workspace root {}: {e}", root.display()))?;
    prepare_environment(&root);
    log::set_logger(&LOGGER).map_err(|e| format!("logger: {e}"))?;
    log::set_max_level(if warnings {
        log::LevelFilter::Warn
    } else {
        log::LevelFilter::Error
    });

    let config = cbindgen::Config::from_file(root.join(CONFIG))?;
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_crate_and_name(&root, CRATE)
        .generate()
        .map_err(|e| format!("cbindgen could not generate the header: {e}"))?;
    let mut generated = Vec::new();
    bindings.write(&mut generated);

    let path = root.join(HEADER);
    let committed = match fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    if committed.as_deref() == Some(generated.as_slice()) {
        eprintln!("c-header: {HEADER} is up to date");
        return Ok(ExitCode::SUCCESS);
    }
    if verify {
        let committed = committed.unwrap_or_default();
        eprintln!(
            "c-header: {HEADER} differs from cbindgen's output (--- the file, +++ cbindgen); \
             regenerate it with `cargo run --release -p c-header` and commit it"
        );
        let diff = unified_diff(
            &String::from_utf8_lossy(&committed),
            &String::from_utf8_lossy(&generated),
            HEADER,
        );
        // the diff goes to stdout, so that it can be piped into a patch; the verdict is above
        std::io::stdout()
            .write_all(diff.as_bytes())
            .map_err(|e| format!("writing the diff: {e}"))?;
        return Ok(ExitCode::from(1));
    }
    fs::write(&path, &generated).map_err(|e| format!("writing {}: {e}", path.display()))?;
    eprintln!("c-header: wrote {HEADER}");
    Ok(ExitCode::SUCCESS)
}

/// Sets what cbindgen's own cargo calls (`cargo metadata`, `cargo rustc -- -Zunpretty=expanded`)
/// read from this process's environment.
fn prepare_environment(root: &Path) {
    // cbindgen reads these variables from its own process, not from arguments, so they are set
    // here, before any thread exists (edition 2021: `set_var` is safe; nothing else reads the
    // environment concurrently).
    //
    // `cargo run` sets CARGO to the cargo binary of the toolchain that built this tool (stable),
    // which cbindgen would call directly; without it cbindgen calls `cargo` from PATH, rustup's
    // proxy, which honours RUSTUP_TOOLCHAIN: the nightly toolchain the expansion needs. A stable
    // cargo would refuse `-Z` and cbindgen would fail, not write a different header.
    env::remove_var("CARGO");
    let toolchain = env::var("C_HEADER_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    env::set_var("RUSTUP_TOOLCHAIN", toolchain);
    // the expansion builds groupnorm-capi's dependencies (check profile): keep them apart from the
    // workspace's target directory, as CI did with the cbindgen command
    if env::var_os("CARGO_EXPAND_TARGET_DIR").is_none() {
        env::set_var("CARGO_EXPAND_TARGET_DIR", root.join("target/cbindgen"));
    }
}

/// cbindgen reports through `log`: errors always reach stderr (as with the cbindgen command's
/// `--quiet`, which CI used); its warnings only with `--warnings`, as they are expected here by
/// the dozen (the enums' newtypes it is told not to export, private items).
struct StderrLogger;

static LOGGER: StderrLogger = StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!("{}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// A unified diff (`diff -u` style, [`CONTEXT`] lines of context) turning `old` into `new`, both
/// named `name`; empty when they are equal. Lines are compared exactly (a trailing newline
/// missing on one side counts as a difference of the last line).
fn unified_diff(old: &str, new: &str, name: &str) -> String {
    let a: Vec<&str> = old.split_inclusive('\n').collect();
    let b: Vec<&str> = new.split_inclusive('\n').collect();
    let ops = edit_script(&a, &b);
    if ops.iter().all(|op| matches!(op, Op::Same(..))) {
        return String::new();
    }
    let mut out = format!("--- a/{name}\n+++ b/{name}\n");
    // group the edits into hunks: runs of changes closer than 2 * CONTEXT share a hunk
    let changed: Vec<usize> = (0..ops.len())
        .filter(|&i| !matches!(ops[i], Op::Same(..)))
        .collect();
    let mut k = 0;
    while k < changed.len() {
        let first = changed[k];
        let mut last = first;
        while k + 1 < changed.len() && changed[k + 1] - last <= 2 * CONTEXT + 1 {
            k += 1;
            last = changed[k];
        }
        k += 1;
        let start = first.saturating_sub(CONTEXT);
        let end = (last + CONTEXT + 1).min(ops.len());
        let (a_start, b_start) = ops[start].position();
        let hunk = &ops[start..end];
        let a_len = hunk
            .iter()
            .filter(|op| !matches!(op, Op::Insert(..)))
            .count();
        let b_len = hunk
            .iter()
            .filter(|op| !matches!(op, Op::Delete(..)))
            .count();
        // diff -u numbers lines from 1, and an empty range by the line before it
        let a_from = if a_len == 0 { a_start } else { a_start + 1 };
        let b_from = if b_len == 0 { b_start } else { b_start + 1 };
        out.push_str(&format!("@@ -{a_from},{a_len} +{b_from},{b_len} @@\n"));
        for op in hunk {
            let (mark, line) = match *op {
                Op::Same(i, _) => (' ', a[i]),
                Op::Delete(i, _) => ('-', a[i]),
                Op::Insert(_, j) => ('+', b[j]),
            };
            out.push(mark);
            out.push_str(line);
            if !line.ends_with('\n') {
                out.push_str("\n\\ No newline at end of file\n");
            }
        }
    }
    out
}

/// One step of an edit script, with the indices (in `a`, in `b`) it is at.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Same(usize, usize),
    Delete(usize, usize),
    Insert(usize, usize),
}

impl Op {
    fn position(self) -> (usize, usize) {
        match self {
            Op::Same(i, j) | Op::Delete(i, j) | Op::Insert(i, j) => (i, j),
        }
    }
}

/// A shortest edit script from `a` to `b` by longest common subsequence: O(len(a) * len(b))
/// time and memory, fine for a header of a few hundred lines. Inputs too large for that (over
/// 16 M cells) get a coarser script: the common prefix and suffix kept, the middle replaced.
fn edit_script(a: &[&str], b: &[&str]) -> Vec<Op> {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut ops: Vec<Op> = (0..prefix).map(|i| Op::Same(i, i)).collect();
    let (n, m) = (am.len(), bm.len());
    if n.saturating_mul(m) > 16 << 20 {
        ops.extend((0..n).map(|i| Op::Delete(prefix + i, prefix)));
        ops.extend((0..m).map(|j| Op::Insert(prefix + n, prefix + j)));
    } else {
        // lcs[i][j]: length of the LCS of am[i..] and bm[j..]
        let mut lcs = vec![0u32; (n + 1) * (m + 1)];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i * (m + 1) + j] = if am[i] == bm[j] {
                    lcs[(i + 1) * (m + 1) + j + 1] + 1
                } else {
                    lcs[(i + 1) * (m + 1) + j].max(lcs[i * (m + 1) + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            let (pi, pj) = (prefix + i, prefix + j);
            if i < n && j < m && am[i] == bm[j] {
                ops.push(Op::Same(pi, pj));
                i += 1;
                j += 1;
            } else if j == m || (i < n && lcs[(i + 1) * (m + 1) + j] >= lcs[i * (m + 1) + j + 1]) {
                ops.push(Op::Delete(pi, pj));
                i += 1;
            } else {
                ops.push(Op::Insert(pi, pj));
                j += 1;
            }
        }
    }
    let (a_end, b_end) = (a.len() - suffix, b.len() - suffix);
    ops.extend((0..suffix).map(|k| Op::Same(a_end + k, b_end + k)));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_diff() {
        assert_eq!(unified_diff("a\nb\n", "a\nb\n", "h"), "");
        assert_eq!(unified_diff("", "", "h"), "");
    }

    #[test]
    fn one_changed_line_with_context() {
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n";
        let new = "1\n2\n3\n4\nfive\n6\n7\n8\n9\n";
        assert_eq!(
            unified_diff(old, new, "h"),
            "--- a/h\n+++ b/h\n@@ -2,7 +2,7 @@\n 2\n 3\n 4\n-5\n+five\n 6\n 7\n 8\n"
        );
    }

    #[test]
    fn distant_changes_make_two_hunks() {
        let old: String = (1..=20).map(|i| format!("{i}\n")).collect();
        let new = old.replace("2\n", "two\n").replace("19\n", "nineteen\n");
        let diff = unified_diff(&old, &new, "h");
        assert_eq!(diff.matches("@@ -").count(), 2, "{diff}");
        assert!(
            diff.contains("@@ -1,5 +1,5 @@\n 1\n-2\n+two\n 3\n"),
            "{diff}"
        );
        assert!(diff.contains("-19\n+nineteen\n 20\n"), "{diff}");
    }

    #[test]
    fn insertion_deletion_and_missing_newline() {
        assert_eq!(
            unified_diff("a\nc\n", "a\nb\nc\n", "h"),
            "--- a/h\n+++ b/h\n@@ -1,2 +1,3 @@\n a\n+b\n c\n"
        );
        assert_eq!(
            unified_diff("a\nb\n", "a\n", "h"),
            "--- a/h\n+++ b/h\n@@ -1,2 +1,1 @@\n a\n-b\n"
        );
        assert_eq!(
            unified_diff("a\n", "a", "h"),
            "--- a/h\n+++ b/h\n@@ -1,1 +1,1 @@\n-a\n+a\n\\ No newline at end of file\n"
        );
        // a whole file added: an empty old range is numbered by the line before it (0)
        assert_eq!(
            unified_diff("", "x\n", "h"),
            "--- a/h\n+++ b/h\n@@ -0,0 +1,1 @@\n+x\n"
        );
    }

    #[test]
    fn edit_script_is_minimal() {
        let a = ["x\n", "a\n", "b\n", "c\n"];
        let b = ["a\n", "b\n", "y\n", "c\n"];
        let ops = edit_script(&a, &b);
        let edits = ops.iter().filter(|op| !matches!(op, Op::Same(..))).count();
        assert_eq!(edits, 2, "{ops:?}");
    }
}
