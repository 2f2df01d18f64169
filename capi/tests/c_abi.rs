//! The C ABI: `src/lib.rs` (of this crate, capi/) against `include/groupnorm.h`, from Rust and from C.
//!
//! How the header is checked (the code's side is `groupnorm::capi::abi`, tables the macros of
//! capi/src/lib.rs build from the Rust definitions themselves, see its module docs):
//!
//! 1. `header_declares_exactly_the_abi_of_the_code` parses the header (comments and the C++
//!    guard dropped, declarations split at top-level `;`) into canonical lines, one per enum
//!    value, struct field and prototype, and requires them to equal the same lines rendered
//!    from the tables, in order: a function, argument name or type, enum value or struct field
//!    that drifts on either side fails it. It needs no compiler, so it runs everywhere.
//! 2. `header_compiles_against_the_library` generates a C file from the tables that asserts, at
//!    compile time and with `-Werror`, every enum value, the size of every enum and of the
//!    struct, every field's offset and exact type, and every function's exact pointer type
//!    against the header; links it against the built `libgroupnorm.so` (so every function is
//!    exported) and runs it; and builds a C++ program from the header, linked the same way (so
//!    the `extern "C"` guard works).
//! 3. `every_extern_fn_is_in_the_table` requires every `extern "C" fn` of capi/src/lib.rs to be in
//!    the tables, so a new function cannot be left out of the check.
//!
//! The C programs are compiled with the `cc` crate's view of the C compiler, against the
//! header and sources embedded in this binary (no path is looked up in the source tree), and
//! linked against the cdylib cargo builds beside the test binary (`target/<profile>/deps/`),
//! or `.gpu/lib/` of a packed tree, or `$GROUPNORM_CDYLIB`. Under cargo a missing compiler or
//! library fails the test (cargo itself links with `cc` on Linux); a packed binary run without
//! them (`bash .gpu/run tests` on a GPU machine) prints why and skips those tests only.
//!
//! On a machine without a GPU every device call must come back as a status: NO_DRIVER where
//! libcuda is absent (this is checked exactly), otherwise one of the statuses that say the device
//! cannot be used. With a GPU, `forward_and_backward_through_the_c_abi` runs real problems
//! through the C entry points and holds them to the f64 reference's accuracy targets.

// The library, under the name the shared test modules use. This crate's own library is a cdylib
// and staticlib only (an rlib named `groupnorm` too would collide with the library's in
// target/), so its source is compiled into this test as the module `capi`, for the ABI tables.
extern crate gn as groupnorm;
#[path = "../src/lib.rs"]
mod capi;

// shared with the library's tests (the workspace root's tests/)
#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/gpu_support/mod.rs"]
mod gpu_support;

use capi::{abi, *};
use common::*;
use groupnorm::cpu::reference;
use groupnorm::gpu::{download, upload, CudaSlice, CudaStream};
use groupnorm::{bf16, f16, DType, Element, GroupNorm, Layout, Stats};
use std::ffi::{c_void, CStr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const HEADER: &str = include_str!("../include/groupnorm.h");
const SMOKE_C: &str = include_str!("c/smoke.c");
const CAPI_RS: &str = include_str!("../src/lib.rs");

// ---------------------------------------------------------------------------------------------
// The header, parsed
// ---------------------------------------------------------------------------------------------

/// Canonical lines for the tables of capi/src/lib.rs (the same form [`parse_header`] produces).
fn lines_from_code() -> Vec<String> {
    let mut lines = Vec::new();
    for e in abi::enums() {
        for (name, value) in &e.values {
            lines.push(format!("enum {} {{ {name} = {value} }}", e.name));
        }
    }
    for s in abi::structs() {
        for f in &s.fields {
            lines.push(format!("struct {} {{ {} {} }}", s.name, f.c_type, f.name));
        }
    }
    for f in abi::functions() {
        lines.push(function_line(
            &f.ret,
            f.name,
            f.params.iter().map(|(n, t)| (t.as_str(), *n)),
        ));
    }
    lines
}

fn function_line<'a>(
    ret: &str,
    name: &str,
    params: impl Iterator<Item = (&'a str, &'a str)>,
) -> String {
    let params: Vec<String> = params.map(|(t, n)| format!("{t} {n}")).collect();
    let params = if params.is_empty() {
        "void".to_string()
    } else {
        params.join(", ")
    };
    format!("{ret} {name}({params})")
}

/// Drops `/* */` and `//` comments.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let block = rest.find("/*");
        let line = rest.find("//");
        match (block, line) {
            (Some(b), l) if l.is_none_or(|l| b < l) => {
                out.push_str(&rest[..b]);
                out.push(' ');
                let end = rest[b + 2..]
                    .find("*/")
                    .expect("unterminated comment in the header");
                rest = &rest[b + 2 + end + 2..];
            }
            (_, Some(l)) => {
                out.push_str(&rest[..l]);
                rest = &rest[l..];
                rest = rest.find('\n').map_or("", |n| &rest[n..]);
            }
            _ => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

/// Drops preprocessor lines, and everything inside `#ifdef __cplusplus` blocks.
fn strip_preprocessor(text: &str) -> String {
    let mut out = String::new();
    let mut skipping: Vec<bool> = Vec::new();
    for line in text.lines() {
        if let Some(directive) = line.trim_start().strip_prefix('#') {
            let directive = directive.trim_start();
            if directive.starts_with("ifdef __cplusplus") {
                skipping.push(true);
            } else if directive.starts_with("if") {
                skipping.push(false);
            } else if directive.starts_with("endif") {
                skipping.pop().expect("#endif without #if in the header");
            }
            continue;
        }
        if !skipping.contains(&true) {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(skipping.is_empty(), "unterminated #if in the header");
    out
}

fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut ident = String::new();
    for ch in text.chars() {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            ident.push(ch);
            continue;
        }
        if !ident.is_empty() {
            tokens.push(std::mem::take(&mut ident));
        }
        if !ch.is_whitespace() {
            tokens.push(ch.to_string());
        }
    }
    if !ident.is_empty() {
        tokens.push(ident);
    }
    tokens
}

/// Splits `tokens` at `sep` where no bracket is open.
fn split_top(tokens: &[String], sep: &str) -> Vec<Vec<String>> {
    let mut parts = vec![Vec::new()];
    let mut depth = 0i32;
    for t in tokens {
        match t.as_str() {
            "{" | "(" | "[" => depth += 1,
            "}" | ")" | "]" => depth -= 1,
            s if s == sep && depth == 0 => {
                parts.push(Vec::new());
                continue;
            }
            _ => {}
        }
        parts.last_mut().unwrap().push(t.clone());
    }
    parts.retain(|p| !p.is_empty());
    parts
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

/// `TYPE... NAME` → (type as space-joined tokens, name).
fn typed_name(tokens: &[String], what: &str) -> (String, String) {
    let (name, ty) = tokens
        .split_last()
        .unwrap_or_else(|| panic!("empty {what} in the header"));
    assert!(
        is_ident(name) && !ty.is_empty(),
        "cannot read {what} `{}` in the header (expected `TYPE NAME`)",
        tokens.join(" ")
    );
    (ty.join(" "), name.clone())
}

/// `typedef KIND [TAG] { BODY } NAME` → (NAME, BODY).
fn typedef_body<'a>(decl: &'a [String], kind: &str) -> (String, &'a [String]) {
    let open = decl
        .iter()
        .position(|t| t == "{")
        .expect("typedef without {");
    let close = decl
        .iter()
        .rposition(|t| t == "}")
        .expect("typedef without }");
    let name = decl[close + 1..].join(" ");
    assert!(
        is_ident(&name) && decl[close + 1..].len() == 1,
        "typedef {kind} must end in one name, got `{name}`"
    );
    if open == 3 {
        assert_eq!(
            decl[2], name,
            "typedef {kind} {}: tag and name differ",
            decl[2]
        );
    } else {
        assert_eq!(
            open, 2,
            "typedef {kind} {name}: unexpected tokens before {{"
        );
    }
    (name, &decl[open + 1..close])
}

/// The header as canonical lines: one per enum value, struct field and prototype.
fn parse_header(text: &str) -> Vec<String> {
    let tokens = tokenize(&strip_preprocessor(&strip_comments(text)));
    let mut lines = Vec::new();
    for decl in split_top(&tokens, ";") {
        let head: Vec<&str> = decl.iter().take(2).map(String::as_str).collect();
        match head.as_slice() {
            ["typedef", "enum"] => {
                let (name, body) = typedef_body(&decl, "enum");
                for item in split_top(body, ",") {
                    let item: Vec<&str> = item.iter().map(String::as_str).collect();
                    let value = match item.as_slice() {
                        [_, "=", v] => v.parse::<i64>(),
                        [_, "=", "-", v] => v.parse::<i64>().map(|v| -v),
                        _ => panic!(
                            "enum {name}: `{}` is not `NAME = VALUE` (values must be explicit)",
                            item.join(" ")
                        ),
                    }
                    .unwrap_or_else(|e| panic!("enum {name}: bad value in `{item:?}`: {e}"));
                    lines.push(format!("enum {name} {{ {} = {value} }}", item[0]));
                }
            }
            ["typedef", "struct"] => {
                let (name, body) = typedef_body(&decl, "struct");
                for field in split_top(body, ";") {
                    let (ty, field) = typed_name(&field, "struct field");
                    lines.push(format!("struct {name} {{ {ty} {field} }}"));
                }
            }
            ["typedef", "char"] if decl[2].starts_with("groupnorm_static_assert") => {}
            ["typedef", ..] => panic!("unexpected typedef `{}` in the header", decl.join(" ")),
            _ => {
                let open = decl
                    .iter()
                    .position(|t| t == "(")
                    .unwrap_or_else(|| panic!("not a prototype: `{}`", decl.join(" ")));
                assert_eq!(
                    decl.last().map(String::as_str),
                    Some(")"),
                    "not a prototype: `{}`",
                    decl.join(" ")
                );
                let (ret, name) = typed_name(&decl[..open], "function");
                let params = split_top(&decl[open + 1..decl.len() - 1], ",");
                let params: Vec<(String, String)> = if params == [vec!["void".to_string()]] {
                    Vec::new()
                } else {
                    params
                        .iter()
                        .map(|p| typed_name(p, &format!("parameter of {name}")))
                        .collect()
                };
                lines.push(function_line(
                    &ret,
                    &name,
                    params.iter().map(|(t, n)| (t.as_str(), n.as_str())),
                ));
            }
        }
    }
    lines
}

#[test]
fn header_declares_exactly_the_abi_of_the_code() {
    let header = parse_header(HEADER);
    let code = lines_from_code();
    let missing: Vec<_> = code.iter().filter(|l| !header.contains(l)).collect();
    let extra: Vec<_> = header.iter().filter(|l| !code.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "include/groupnorm.h disagrees with capi/src/lib.rs:\n  in the code, not in the header:\n    \
         {}\n  in the header, not in the code:\n    {}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n    "),
        extra
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n    ")
    );
    assert_eq!(header, code, "same declarations, in a different order");
    // the tables are not empty (a parser that found nothing would agree with nothing)
    assert_eq!(abi::functions().len(), 8);
    assert!(header.len() > 20, "{header:#?}");
}

#[test]
fn header_has_its_guards() {
    let lines: Vec<&str> = HEADER.lines().map(str::trim).collect();
    let at = |l: &str| {
        lines
            .iter()
            .position(|x| *x == l)
            .unwrap_or_else(|| panic!("header lacks `{l}`"))
    };
    let (ifndef, define) = (at("#ifndef GROUPNORM_H"), at("#define GROUPNORM_H"));
    assert_eq!(define, ifndef + 1, "include guard");
    assert_eq!(
        lines.iter().rev().find(|l| !l.is_empty()),
        Some(&"#endif /* GROUPNORM_H */")
    );
    let open = at("extern \"C\" {");
    assert_eq!(lines[open - 1], "#ifdef __cplusplus");
    assert_eq!(lines[open + 1], "#endif");
    assert!(HEADER.contains("#ifdef __cplusplus\n} /* extern \"C\" */\n#endif"));
}

#[test]
fn the_parser_sees_drift() {
    // the check of the header is only as good as its parser: show it notices each kind of change
    let code = lines_from_code();
    let cases = [
        (
            "GROUPNORM_STATUS_INTERNAL = 8",
            "GROUPNORM_STATUS_INTERNAL = 9",
        ),
        ("    int32_t ndims;", "    int64_t ndims;"),
        ("    groupnorm_path_t path;\n", ""),
        ("float *mean", "double *mean"),
        ("size_t workspace_bytes,", ""),
        ("const void *weight, void *dx", "const void *w, void *dx"),
        ("const char *groupnorm_last_error(void);", ""),
    ];
    for (from, to) in cases {
        assert!(
            HEADER.contains(from),
            "test case `{from}` not in the header"
        );
        let changed = HEADER.replacen(from, to, 1);
        assert_ne!(
            parse_header(&changed),
            code,
            "`{from}` → `{to}` went unnoticed"
        );
    }
}

#[test]
fn every_extern_fn_is_in_the_table() {
    let listed: Vec<&str> = abi::functions().iter().map(|f| f.name).collect();
    let mut found = Vec::new();
    for (i, _) in CAPI_RS.match_indices("extern \"C\" fn ") {
        let rest = &CAPI_RS[i + "extern \"C\" fn ".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.push(name);
        }
    }
    assert_eq!(
        found.len(),
        CAPI_RS.matches("#[no_mangle]").count(),
        "every extern \"C\" fn is #[no_mangle], and only those"
    );
    for name in &found {
        assert!(
            listed.contains(&name.as_str()),
            "capi/src/lib.rs exports `{name}` but its c_functions! list (and so the header check) \
             lacks it"
        );
    }
    assert_eq!(found.len(), listed.len(), "{found:?} vs {listed:?}");
}

// ---------------------------------------------------------------------------------------------
// C programs
// ---------------------------------------------------------------------------------------------

/// Whether a missing C compiler or library must fail the test: always under cargo (which sets
/// `CARGO` for the tests it runs, and links with `cc` itself), or with GROUPNORM_REQUIRE_CC=1.
fn c_required() -> bool {
    std::env::var_os("CARGO").is_some()
        || std::env::var("GROUPNORM_REQUIRE_CC").is_ok_and(|v| v == "1")
}

fn skip_or_fail(test: &str, why: String) -> Option<Toolchain> {
    if c_required() {
        panic!("{test}: {why}");
    }
    eprintln!("skipping {test}: {why}");
    None
}

/// The target triple of this binary, as the `cc` crate spells it.
fn host_triple() -> String {
    let arch = std::env::consts::ARCH;
    if cfg!(target_os = "macos") {
        format!("{arch}-apple-darwin")
    } else if cfg!(target_env = "musl") {
        format!("{arch}-unknown-linux-musl")
    } else {
        format!("{arch}-unknown-linux-gnu")
    }
}

/// `libgroupnorm.so` (or `.dylib`): `$GROUPNORM_CDYLIB`, else beside the test binary (cargo:
/// `target/<profile>/deps/`), else in its parent directory, else in `lib/` there
/// (`.gpu/bin/test-c_abi` → `.gpu/lib/`), else in `.gpu/lib/` under the working directory.
fn find_cdylib() -> Result<PathBuf, String> {
    let file = format!(
        "{}groupnorm{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    if let Some(p) = std::env::var_os("GROUPNORM_CDYLIB") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("GROUPNORM_CDYLIB={} is not a file", p.display()))
        };
    }
    let here = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    // Under cargo: build this crate's cdylib now. `cargo test` does not build it (the crate has
    // no rlib for the tests to link, so nothing asks for it), and a libgroupnorm.so left in the
    // target directory by an earlier build would be tested in its place. Cargo holds no lock
    // while tests run, so this nested build shares the target directory; it is a no-op when the
    // library is fresh. Packed test binaries on a GPU machine (no cargo) skip it.
    if let (Some(cargo), Some(here)) = (option_env!("CARGO"), &here) {
        if let Some(profile_dir) = here.parent().filter(|_| here.ends_with("deps")) {
            if let Some(built) = build_cdylib(cargo, profile_dir, &file)? {
                return Ok(built);
            }
        }
    }
    let mut candidates = Vec::new();
    if let Some(here) = here {
        candidates.push(here.join(&file));
        if let Some(up) = here.parent() {
            candidates.push(up.join(&file));
            candidates.push(up.join("lib").join(&file));
        }
    }
    candidates.push(Path::new(".gpu/lib").join(&file));
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| {
            format!(
                "no {file} found (looked at {candidates:?}; set GROUPNORM_CDYLIB, or pack it into \
                 .gpu/lib/)"
            )
        })
}

/// `cargo build --lib -p groupnorm-capi` in the profile of this test binary (`profile_dir` is
/// target/<profile>/), and the library it leaves there; `None` when cargo cannot be run here.
fn build_cdylib(cargo: &str, profile_dir: &Path, file: &str) -> Result<Option<PathBuf>, String> {
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--lib", "-p", "groupnorm-capi"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target_dir) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target_dir);
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(_) => return Ok(None), // no cargo here (packed binaries)
    };
    if !out.status.success() {
        return Err(format!(
            "building libgroupnorm failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let lib = profile_dir.join(file);
    Ok(lib.is_file().then_some(lib))
}

/// A C compiler, the library, and a scratch directory holding `include/groupnorm.h`.
struct Toolchain {
    cc: cc::Tool,
    cxx: Option<cc::Tool>,
    lib: PathBuf,
    dir: PathBuf,
}

fn compiler(dir: &Path, cpp: bool) -> Result<cc::Tool, String> {
    let target = host_triple();
    let tool = cc::Build::new()
        .cpp(cpp)
        .target(&target)
        .host(&target)
        .opt_level(0)
        .debug(false)
        .out_dir(dir)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .try_get_compiler()
        .map_err(|e| format!("no C{} compiler: {e}", if cpp { "++" } else { "" }))?;
    match Command::new(tool.path()).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(tool),
        Ok(o) => Err(format!(
            "{} --version failed: {}",
            tool.path().display(),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("cannot run {}: {e}", tool.path().display())),
    }
}

fn toolchain(test: &str) -> Option<Toolchain> {
    if !cfg!(unix) {
        eprintln!("skipping {test}: the C programs are built for Unix-like systems only");
        return None;
    }
    let lib = match find_cdylib() {
        Ok(lib) => lib,
        Err(why) => return skip_or_fail(test, why),
    };
    let dir = std::env::temp_dir().join(format!("groupnorm-c-abi-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("include")).expect("scratch directory");
    std::fs::write(dir.join("include/groupnorm.h"), HEADER).expect("write the header");
    let cc = match compiler(&dir, false) {
        Ok(cc) => cc,
        Err(why) => return skip_or_fail(test, why),
    };
    let cxx = compiler(&dir, true)
        .map_err(|why| eprintln!("{test}: C++ part skipped: {why}"))
        .ok();
    Some(Toolchain { cc, cxx, lib, dir })
}

impl Toolchain {
    /// Compiles `source` (C99, or C++11 with `cpp`) with every warning an error, links it
    /// against the library (rpath set) and returns the executable.
    fn build(&self, name: &str, source: &str, cpp: bool) -> PathBuf {
        let tool = if cpp {
            self.cxx.as_ref().unwrap()
        } else {
            &self.cc
        };
        let src = self
            .dir
            .join(format!("{name}.{}", if cpp { "cpp" } else { "c" }));
        let exe = self.dir.join(name);
        std::fs::write(&src, source).expect("write the source");
        let libdir = self.lib.parent().unwrap();
        let mut cmd = tool.to_command();
        cmd.arg(if cpp { "-std=c++11" } else { "-std=c99" })
            .args(["-Wall", "-Wextra", "-pedantic", "-Werror"])
            .arg("-I")
            .arg(self.dir.join("include"))
            .arg(&src)
            .arg(&self.lib)
            .arg(format!("-Wl,-rpath,{}", libdir.display()))
            .arg("-o")
            .arg(&exe);
        let out = cmd.output().expect("run the C compiler");
        assert!(
            out.status.success(),
            "compiling {name} failed: {cmd:?}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    }

    /// Runs `exe` with `args`, printing its output; returns (success, stdout).
    fn run(&self, exe: &Path, args: &[&str]) -> (bool, String) {
        let out = Command::new(exe)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        (out.status.success(), stdout)
    }
}

impl Drop for Toolchain {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A C file that asserts the tables against the header at compile time (see the module docs).
fn abi_check_source() -> String {
    let mut asserts = String::new();
    let mut body = String::new();
    let mut n = 0;
    let mut assert = |cond: String| {
        asserts.push_str(&format!("GN_ASSERT({n}, {cond});\n"));
        n += 1;
    };
    for e in abi::enums() {
        assert(format!("sizeof({}) == 4", e.name));
        for (name, value) in &e.values {
            assert(format!("{name} == {value}"));
        }
    }
    for s in abi::structs() {
        assert(format!("sizeof({}) == {}", s.name, s.size));
        body.push_str(&format!("    {{ {0} s; memset(&s, 0, sizeof s);\n", s.name));
        for f in &s.fields {
            assert(format!("offsetof({}, {}) == {}", s.name, f.name, f.offset));
            // a pointer to the field must have exactly the table's type
            body.push_str(&format!(
                "      {{ {} *p = &s.{}; (void)p; }}\n",
                f.c_type, f.name
            ));
        }
        body.push_str("    }\n");
    }
    for f in abi::functions() {
        let params: Vec<&str> = f.params.iter().map(|(_, t)| t.as_str()).collect();
        let params = if params.is_empty() {
            "void".to_string()
        } else {
            params.join(", ")
        };
        // the function must have exactly this type (and be exported: the program is linked)
        body.push_str(&format!(
            "    {{ {} (*volatile p)({params}) = {}; if (!p) return 1; }}\n",
            f.ret, f.name
        ));
    }
    format!(
        "/* generated by tests/c_abi.rs from groupnorm::capi::abi */\n\
         #include \"groupnorm.h\"\n\
         #include <stddef.h>\n#include <stdio.h>\n#include <string.h>\n\n\
         #define GN_ASSERT(n, cond) typedef char gn_assert_##n[(cond) ? 1 : -1]\n\
         {asserts}\n\
         int main(void)\n{{\n{body}    printf(\"abi check: {n} static assertions hold\\n\");\n    \
         return 0;\n}}\n"
    )
}

#[test]
fn header_compiles_against_the_library() {
    let Some(tc) = toolchain("header_compiles_against_the_library") else {
        return;
    };
    let source = abi_check_source();
    let exe = tc.build("abi_check", &source, false);
    let (ok, out) = tc.run(&exe, &[]);
    assert!(ok && out.contains("static assertions hold"), "{out}");

    // C++: the header compiles as C++ and its functions link with C names (the extern "C"
    // guard), and the generated checks hold there too
    if tc.cxx.is_some() {
        let cpp = "#include \"groupnorm.h\"\n#include <cstdio>\n\
                   int main() {\n\
                   groupnorm_problem_t p = groupnorm_problem_t();\n\
                   std::size_t bytes = 1;\n\
                   groupnorm_status_t s = groupnorm_forward_workspace_size(&p, 0, &bytes);\n\
                   std::printf(\"c++: %s (%s)\\n\", groupnorm_status_string(s), \
                   groupnorm_last_error());\n\
                   return s == GROUPNORM_STATUS_INVALID_ARGUMENT && bytes == 0 ? 0 : 1;\n}\n";
        let exe = tc.build("cxx_check", cpp, true);
        let (ok, out) = tc.run(&exe, &[]);
        assert!(ok, "the C++ program failed: {out}");
    }
}

/// The status a valid problem gets from the NULL stream on this machine, as smoke.c's first
/// argument: exactly NO_DRIVER without libcuda; otherwise "device", any status that says the
/// device cannot be used (the C program has no current CUDA context, so the NULL stream names
/// no device: NO_DEVICE without one, a CUDA error with one).
fn expected_device_status() -> String {
    if groupnorm::gpu::driver_present() {
        "device".to_string()
    } else {
        GROUPNORM_STATUS_NO_DRIVER.0.to_string()
    }
}

#[test]
fn c_smoke_program() {
    let Some(tc) = toolchain("c_smoke_program") else {
        return;
    };
    let exe = tc.build("smoke", SMOKE_C, false);
    let (ok, out) = tc.run(
        &exe,
        &[&expected_device_status(), env!("CARGO_PKG_VERSION")],
    );
    assert!(ok, "tests/c/smoke.c failed:\n{out}");
    let summary = out.lines().last().unwrap_or("");
    assert!(
        summary.starts_with("smoke: ") && summary.ends_with(" checks, 0 failures"),
        "{summary}"
    );
    let checks: usize = summary["smoke: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(checks > 100, "only {checks} checks ran");
}

// ---------------------------------------------------------------------------------------------
// The same from Rust, calling the extern fns directly
// ---------------------------------------------------------------------------------------------

fn cstr(p: *const std::ffi::c_char) -> String {
    assert!(!p.is_null());
    // SAFETY: the library returns NUL-terminated strings that live at least until the next call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn last_error() -> String {
    cstr(groupnorm_last_error())
}

const DIMS: [i64; 4] = [2, 8, 4, 4];

fn problem(dims: &[i64]) -> groupnorm_problem_t {
    groupnorm_problem_t {
        dims: dims.as_ptr(),
        ndims: dims.len() as i32,
        groups: 4,
        eps: 1e-5,
        layout: GROUPNORM_LAYOUT_NCHW,
        dtype: GROUPNORM_DTYPE_F32,
        param_dtype: GROUPNORM_DTYPE_F32,
        path: GROUPNORM_PATH_AUTO,
        activation: GROUPNORM_ACTIVATION_NONE,
    }
}

/// Calls function `which` (0 forward workspace, 1 backward workspace, 2 forward, 3 backward,
/// 4 backward_activated) with NULL data pointers and the NULL stream; returns the status and `*bytes`.
fn call(which: usize, p: *const groupnorm_problem_t) -> (groupnorm_status_t, usize) {
    let null = std::ptr::null_mut::<c_void>();
    let mut bytes = 12345usize;
    // SAFETY: `p` is NULL or points to a problem whose dims outlive the call; every data pointer
    // is NULL and the stream is the NULL stream, which the library never dereferences without a
    // device and a context.
    let s = unsafe {
        match which {
            0 => groupnorm_forward_workspace_size(p, null, &mut bytes),
            1 => groupnorm_backward_workspace_size(p, null, &mut bytes),
            2 => groupnorm_forward(
                p,
                null,
                null,
                null,
                null,
                null.cast(),
                null.cast(),
                null,
                0,
                null,
            ),
            3 => groupnorm_backward(
                p,
                null,
                null,
                null.cast(),
                null.cast(),
                null,
                null,
                null,
                null,
                null,
                0,
                null,
            ),
            _ => groupnorm_backward_activated(
                p,
                null,
                null,
                null.cast(),
                null.cast(),
                null,
                null,
                null,
                null,
                null,
                null,
                0,
                null,
            ),
        }
    };
    (s, if which < 2 { bytes } else { 0 })
}

const FUNCTIONS: [&str; 5] = [
    "groupnorm_forward_workspace_size",
    "groupnorm_backward_workspace_size",
    "groupnorm_forward",
    "groupnorm_backward",
    "groupnorm_backward_activated",
];

#[test]
fn version_and_status_strings() {
    assert_eq!(cstr(groupnorm_version()), env!("CARGO_PKG_VERSION"));
    let all: Vec<String> = (0..=8)
        .map(|i| cstr(groupnorm_status_string(groupnorm_status_t(i))))
        .collect();
    for (i, s) in all.iter().enumerate() {
        assert!(!s.is_empty(), "status {i}");
        assert_eq!(all.iter().filter(|t| *t == s).count(), 1, "{s} twice");
    }
    assert_eq!(all[0], "ok");
    assert_eq!(all[1], "invalid argument");
    for unknown in [-1, 9, i32::MAX, i32::MIN] {
        assert_eq!(
            cstr(groupnorm_status_string(groupnorm_status_t(unknown))),
            "unknown status"
        );
    }
    // the constants are the enum's table, in order, 0..=8
    let table = groupnorm_status_t::table();
    let values: Vec<i32> = table.values.iter().map(|v| v.1).collect();
    assert_eq!(values, (0..=8).collect::<Vec<_>>());
}

#[test]
fn invalid_problems_are_refused_before_the_driver() {
    let negative = [2, 8, -4, 4];
    let zero_channels = [2, 0, 4, 4];
    let two_d = [16i64, 256];
    let huge = [i64::MAX, 8, 4, 4];
    let huge_empty = [1i64 << 30, 1_431_655_764, 0];
    type Edit = Box<dyn Fn(&mut groupnorm_problem_t)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("ndims = 1", Box::new(|p| p.ndims = 1), "ndims is 1"),
        ("ndims = -3", Box::new(|p| p.ndims = -3), "ndims is -3"),
        (
            "dims NULL",
            Box::new(|p| p.dims = std::ptr::null()),
            "dims is NULL",
        ),
        (
            "negative dim",
            Box::new(move |p| p.dims = negative.as_ptr()),
            "dims[2] is -4",
        ),
        (
            "groups not dividing channels",
            Box::new(|p| p.groups = 3),
            "channels (8) must be divisible by groups (3)",
        ),
        (
            "groups = 0",
            Box::new(|p| p.groups = 0),
            "groups must be at least 1",
        ),
        ("groups = -2", Box::new(|p| p.groups = -2), "groups is -2"),
        (
            "channels = 0",
            Box::new(move |p| p.dims = zero_channels.as_ptr()),
            "channels must be at least 1",
        ),
        (
            "groups not dividing channels, 2-D",
            Box::new(move |p| {
                p.dims = two_d.as_ptr();
                p.ndims = 2;
                p.groups = 7;
            }),
            "channels (256) must be divisible by groups (7)",
        ),
        ("eps = inf", Box::new(|p| p.eps = f64::INFINITY), "eps must"),
        (
            "dtype = 3",
            Box::new(|p| p.dtype = groupnorm_dtype_t(3)),
            "dtype is 3",
        ),
        (
            "f16 params for bf16",
            Box::new(|p| {
                p.dtype = GROUPNORM_DTYPE_BF16;
                p.param_dtype = GROUPNORM_DTYPE_F16;
            }),
            "parameters must be f32 or bf16",
        ),
        (
            "layout = -1",
            Box::new(|p| p.layout = groupnorm_layout_t(-1)),
            "layout is -1",
        ),
        (
            "path = 4",
            Box::new(|p| p.path = groupnorm_path_t(4)),
            "path is 4",
        ),
        (
            "activation = 2",
            Box::new(|p| p.activation = groupnorm_activation_t(2)),
            "activation is 2",
        ),
        (
            "too large",
            Box::new(move |p| p.dims = huge.as_ptr()),
            "too large",
        ),
        // issue 15: refused before anything is read or allocated (this aborted on a 16 GiB
        // allocation); `dims` points at 4 values, so reading more would be out of bounds
        (
            "ndims = INT32_MAX",
            Box::new(|p| p.ndims = i32::MAX),
            "at most 64 dims",
        ),
        ("ndims = 65", Box::new(|p| p.ndims = 65), "ndims is 65"),
        // issue 15: zero elements, but 3 * N * C workspace floats wrap 64 bits
        (
            "huge but empty",
            Box::new(move |p| {
                p.dims = huge_empty.as_ptr();
                p.ndims = 3;
            }),
            "too large",
        ),
        // issue 15: valid in f64, 0 in the f32 every path computes with
        ("eps = 1e-50", Box::new(|p| p.eps = 1e-50), "eps must"),
        ("eps = 1e300", Box::new(|p| p.eps = 1e300), "eps must"),
    ];
    for (which, function) in FUNCTIONS.iter().enumerate() {
        let (s, bytes) = call(which, std::ptr::null());
        assert_eq!(
            s, GROUPNORM_STATUS_INVALID_ARGUMENT,
            "{function}: NULL problem"
        );
        assert_eq!(last_error(), format!("{function}: problem is NULL"));
        assert_eq!(bytes, 0);
        for (name, edit, needle) in &cases {
            let mut p = problem(&DIMS);
            edit(&mut p);
            let (s, bytes) = call(which, &p);
            let msg = last_error();
            assert_eq!(
                s, GROUPNORM_STATUS_INVALID_ARGUMENT,
                "{function}: {name}: {msg}"
            );
            assert!(
                msg.starts_with(function) && msg.contains(needle),
                "{function}: {name}: `{msg}` lacks `{needle}`"
            );
            assert_eq!(bytes, 0, "{function}: {name}: *bytes");
        }
    }
    for which in 0..2 {
        let p = problem(&DIMS);
        // SAFETY: a valid problem; NULL bytes is what is being tested.
        let s = unsafe {
            if which == 0 {
                groupnorm_forward_workspace_size(&p, std::ptr::null_mut(), std::ptr::null_mut())
            } else {
                groupnorm_backward_workspace_size(&p, std::ptr::null_mut(), std::ptr::null_mut())
            }
        };
        assert_eq!(s, GROUPNORM_STATUS_INVALID_ARGUMENT);
        assert!(last_error().ends_with("bytes is NULL"), "{}", last_error());
    }
}

/// Statuses that say the device cannot be used.
const DEVICE_STATUSES: [groupnorm_status_t; 5] = [
    GROUPNORM_STATUS_NO_DRIVER,
    GROUPNORM_STATUS_NO_DEVICE,
    GROUPNORM_STATUS_KERNELS_NOT_BUILT,
    GROUPNORM_STATUS_CUDA_ERROR,
    GROUPNORM_STATUS_UNSUPPORTED,
];

#[test]
fn a_valid_problem_without_a_usable_device_is_a_status() {
    // A new thread has no current CUDA context (another test, or libtest running tests on its
    // main thread, may have made one current on theirs), so the NULL stream names no device on
    // any machine. Without libcuda (this crate's CI) that is NO_DRIVER, exactly.
    std::thread::spawn(valid_problems_on_a_thread_without_a_context)
        .join()
        .expect("the checks passed");
}

fn valid_problems_on_a_thread_without_a_context() {
    let driver = groupnorm::gpu::driver_present();
    for (which, function) in FUNCTIONS.iter().enumerate() {
        for dims in [&DIMS[..], &[1, 320, 64, 64], &[16, 8]] {
            let (s, bytes) = call(which, &problem(dims));
            let msg = last_error();
            if driver {
                assert!(DEVICE_STATUSES.contains(&s), "{function}: {s:?}: {msg}");
            } else {
                assert_eq!(s, GROUPNORM_STATUS_NO_DRIVER, "{function}: {msg}");
                assert!(msg.contains("no CUDA driver"), "{msg}");
            }
            assert!(msg.starts_with(&format!("{function}: ")), "{msg}");
            assert_eq!(bytes, 0);
        }
    }
}

#[test]
fn last_error_is_per_thread_and_cleared_by_success() {
    let (s, _) = call(2, std::ptr::null());
    assert_eq!(s, GROUPNORM_STATUS_INVALID_ARGUMENT);
    let here = last_error();
    assert_eq!(here, "groupnorm_forward: problem is NULL");
    // string functions leave it alone
    let _ = (
        groupnorm_version(),
        groupnorm_status_string(GROUPNORM_STATUS_OK),
    );
    assert_eq!(last_error(), here);
    // another thread has its own, empty until it calls
    let there = std::thread::spawn(|| {
        let before = last_error();
        let mut p = problem(&DIMS);
        p.groups = 3;
        let (s, _) = call(0, &p);
        (before, s, last_error())
    })
    .join()
    .unwrap();
    assert_eq!(there.0, "");
    assert_eq!(there.1, GROUPNORM_STATUS_INVALID_ARGUMENT);
    assert!(there.2.contains("divisible"), "{}", there.2);
    assert_eq!(
        last_error(),
        here,
        "another thread's error leaked into this one"
    );
}

#[test]
fn the_status_mapping_is_public() {
    assert_eq!(
        capi::status_of(&groupnorm::Error::NoDriver),
        GROUPNORM_STATUS_NO_DRIVER
    );
    assert_eq!(
        capi::status_of(&groupnorm::Error::KernelsNotBuilt),
        GROUPNORM_STATUS_KERNELS_NOT_BUILT
    );
}

// ---------------------------------------------------------------------------------------------
// On a GPU: real problems through the C entry points
// ---------------------------------------------------------------------------------------------

fn dtype_of<E: Element>() -> groupnorm_dtype_t {
    match E::DTYPE {
        DType::F32 => GROUPNORM_DTYPE_F32,
        DType::F16 => GROUPNORM_DTYPE_F16,
        DType::BF16 => GROUPNORM_DTYPE_BF16,
        // the C ABI has no f64 (the GPU path refuses it); the GPU tests never ask for it
        other => panic!("no C dtype for {other}"),
    }
}

fn dptr<E>(s: &CudaSlice<E>, stream: &Arc<CudaStream>) -> *mut c_void {
    use groupnorm::cudarc::driver::DevicePtr;
    let (p, _sync) = s.device_ptr(stream);
    p as usize as *mut c_void
}

fn status_ok(s: groupnorm_status_t, what: &str) {
    assert_eq!(s, GROUPNORM_STATUS_OK, "{what}: {}", last_error());
    assert_eq!(last_error(), "");
}

/// Forward then backward of one problem through the C ABI on `stream` (a created stream, or
/// the NULL stream with the context current), against the f64 reference. With `silu`, the
/// problem fuses a SiLU and the backward is `groupnorm_backward_activated`.
fn c_abi_case<T: Element, P: Element>(
    stream: &Arc<CudaStream>,
    null_stream: bool,
    dims: &[usize],
    groups: usize,
    silu: bool,
) {
    let ctx = format!(
        "{dims:?} G={groups} {}/{} {} stream silu={silu}",
        T::DTYPE,
        P::DTYPE,
        if null_stream { "NULL" } else { "created" }
    );
    let act = if silu {
        groupnorm::Activation::Silu
    } else {
        groupnorm::Activation::None
    };
    let gn = GroupNorm::new(groups, dims[1])
        .unwrap()
        .with_activation(act);
    let (c, numel, rows) = (dims[1], dims.iter().product::<usize>(), dims[0] * groups);
    let mut r = rng(7 + numel as u64);
    let x: Vec<T> = normal_vec(&mut r, numel, 0.5, 2.0);
    let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<P> = normal_vec(&mut r, c, 0.0, 0.5);
    let dy: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let want = reference::forward(&gn, &x, dims, Some(&w[..]), Some(&b[..])).unwrap();
    let grads =
        reference::backward_activated(&gn, &dy, &x, dims, Some(&w[..]), Some(&b[..])).unwrap();

    let up = |v: &[T]| upload(stream, v).unwrap();
    let upp = |v: &[P]| upload(stream, v).unwrap();
    let (xd, dyd, wd, bd) = (up(&x), up(&dy), upp(&w), upp(&b));
    let yd = up(&gpu_support::nans::<T>(numel));
    let dxd = up(&gpu_support::nans::<T>(numel));
    let (dwd, dbd) = (upp(&gpu_support::nans(c)), upp(&gpu_support::nans(c)));
    let meand = upload(stream, &vec![f32::NAN; rows]).unwrap();
    let rstdd = upload(stream, &vec![f32::NAN; rows]).unwrap();

    let dims64: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let mut p = problem(&dims64);
    p.groups = groups as i64;
    p.dtype = dtype_of::<T>();
    p.param_dtype = dtype_of::<P>();
    if silu {
        p.activation = GROUPNORM_ACTIVATION_SILU;
    }
    let s: *mut c_void = if null_stream {
        std::ptr::null_mut()
    } else {
        stream.cu_stream().cast()
    };

    let mut fwd_bytes = usize::MAX;
    let mut bwd_bytes = usize::MAX;
    // SAFETY: `p` and its dims outlive the calls; `s` is a stream of this device's primary
    // context (or NULL with that context current on this thread).
    unsafe {
        status_ok(
            groupnorm_forward_workspace_size(&p, s, &mut fwd_bytes),
            &ctx,
        );
        status_ok(
            groupnorm_backward_workspace_size(&p, s, &mut bwd_bytes),
            &ctx,
        );
    }
    let ws = upload(stream, &vec![0u8; fwd_bytes.max(bwd_bytes).max(1)]).unwrap();

    if fwd_bytes > 0 {
        // too small a workspace is refused, not overrun
        // SAFETY: as below; the call is refused before any launch.
        let s2 = unsafe {
            groupnorm_forward(
                &p,
                dptr(&xd, stream),
                dptr(&yd, stream),
                dptr(&wd, stream),
                dptr(&bd, stream),
                dptr(&meand, stream).cast(),
                dptr(&rstdd, stream).cast(),
                dptr(&ws, stream),
                fwd_bytes - 1,
                s,
            )
        };
        assert_eq!(
            s2,
            GROUPNORM_STATUS_INVALID_ARGUMENT,
            "{ctx}: {}",
            last_error()
        );
        assert!(last_error().contains("workspace"), "{}", last_error());
    }

    // SAFETY: every pointer is a live allocation of this device of the size the problem
    // implies (x, y: numel T; weight, bias: C P; mean, rstd: N*G f32; workspace: at least the
    // queried bytes); outputs do not overlap inputs; all outlive the synchronize below.
    unsafe {
        status_ok(
            groupnorm_forward(
                &p,
                dptr(&xd, stream),
                dptr(&yd, stream),
                dptr(&wd, stream),
                dptr(&bd, stream),
                dptr(&meand, stream).cast(),
                dptr(&rstdd, stream).cast(),
                dptr(&ws, stream),
                ws.len(),
                s,
            ),
            &ctx,
        );
    }
    let y = download(stream, &yd).unwrap();
    let stats = Stats {
        mean: download(stream, &meand).unwrap(),
        rstd: download(stream, &rstdd).unwrap(),
    };
    assert_forward_close(&y, &want.y, F32_FORWARD_ABS, &format!("{ctx}: y"));
    assert_stats_close(&stats, &want, F32_FORWARD_ABS, &format!("{ctx}: stats"));

    // SAFETY: as for the forward pass; mean and rstd are the statistics it saved for this x,
    // and the bias is the forward pass's.
    unsafe {
        let status = if silu {
            groupnorm_backward_activated(
                &p,
                dptr(&dyd, stream),
                dptr(&xd, stream),
                dptr(&meand, stream).cast(),
                dptr(&rstdd, stream).cast(),
                dptr(&wd, stream),
                dptr(&bd, stream),
                dptr(&dxd, stream),
                dptr(&dwd, stream),
                dptr(&dbd, stream),
                dptr(&ws, stream),
                ws.len(),
                s,
            )
        } else {
            groupnorm_backward(
                &p,
                dptr(&dyd, stream),
                dptr(&xd, stream),
                dptr(&meand, stream).cast(),
                dptr(&rstdd, stream).cast(),
                dptr(&wd, stream),
                dptr(&dxd, stream),
                dptr(&dwd, stream),
                dptr(&dbd, stream),
                dptr(&ws, stream),
                ws.len(),
                s,
            )
        };
        status_ok(status, &ctx);
    }
    let dx = download(stream, &dxd).unwrap();
    // dx errors are measured against the gradient reaching the normalization (dy without an
    // activation), as everywhere else
    let geo = gn.geometry(dims).unwrap();
    let dz = reference::pre_activation_grad_f64(
        &geo,
        gn.eps(),
        act,
        &to_f64(&dy),
        &to_f64(&x),
        Some(&to_f64(&w)),
        Some(&to_f64(&b)),
    );
    let scale = dx_scale(
        &dz,
        dims,
        groups,
        Layout::Nchw,
        Some(&to_f64(&w)),
        &want.rstd,
    );
    assert_dx_close(&dx, &grads.dx, scale, &format!("{ctx}: dx"));
    let dw = download(stream, &dwd).unwrap();
    let db = download(stream, &dbd).unwrap();
    assert_param_grad_close(&dw, &grads.dweight, "dweight", &ctx);
    assert_param_grad_close(&db, &grads.dbias, "dbias", &ctx);
    println!("{ctx}: ok (workspace {fwd_bytes} B forward, {bwd_bytes} B backward)");
}

#[test]
fn forward_and_backward_through_the_c_abi() {
    let Some(gpu) = gpu_support::gpu_or_skip("forward_and_backward_through_the_c_abi") else {
        return;
    };
    let stream = gpu.new_stream().expect("a stream");
    for (dims, groups) in [
        (&[3usize, 4][..], 2usize),
        (&[2, 6, 7, 5], 3),
        (&[1, 320, 64, 64], 32),
        (&[2, 64, 33, 17], 8),
    ] {
        c_abi_case::<f32, f32>(&stream, false, dims, groups, false);
        c_abi_case::<f16, f32>(&stream, false, dims, groups, false);
        c_abi_case::<bf16, bf16>(&stream, false, dims, groups, false);
    }
    // GroupNorm + SiLU through groupnorm_backward_activated
    for (dims, groups) in [(&[2usize, 6, 7, 5][..], 3usize), (&[1, 320, 64, 64], 32)] {
        c_abi_case::<f32, f32>(&stream, false, dims, groups, true);
        c_abi_case::<f16, f32>(&stream, false, dims, groups, true);
    }
    // PyTorch's default stream is the NULL (legacy) stream of the current context
    gpu.context().bind_to_thread().expect("bind the context");
    let legacy = gpu.context().default_stream();
    c_abi_case::<f16, f16>(&legacy, true, &[2, 32, 16, 16], 32, false);

    // NHWC: supported, or refused as UNSUPPORTED (not as an invalid argument)
    let dims = [2i64, 8, 4, 4];
    let mut p = problem(&dims);
    p.layout = GROUPNORM_LAYOUT_NHWC;
    let mut bytes = 0;
    // SAFETY: a valid problem and a stream of this device.
    let s = unsafe { groupnorm_forward_workspace_size(&p, stream.cu_stream().cast(), &mut bytes) };
    assert!(
        s == GROUPNORM_STATUS_OK || s == GROUPNORM_STATUS_UNSUPPORTED,
        "NHWC: {s:?}: {}",
        last_error()
    );
}

/// The plain backward refuses a problem with an activation (it has no bias to recompute the
/// activation's input from) and names the function to call instead, on any machine.
#[test]
fn plain_backward_refuses_an_activation() {
    let mut p = problem(&DIMS);
    p.activation = GROUPNORM_ACTIVATION_SILU;
    let (s, _) = call(3, &p);
    assert_eq!(s, GROUPNORM_STATUS_INVALID_ARGUMENT);
    let msg = last_error();
    assert!(
        msg.contains("silu") && msg.contains("groupnorm_backward_activated"),
        "{msg}"
    );
}
