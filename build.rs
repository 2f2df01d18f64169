//! Compiles `kernels/*.cu` into fatbins (SASS for every target architecture plus PTX for the
//! newest) and writes `$OUT_DIR/kernels.rs`, which embeds them with `include_bytes!`.
//!
//! Without nvcc the crate still builds: `kernels.rs` then embeds nothing, a cargo warning says so,
//! and the GPU API returns `Error::KernelsNotBuilt`. `GROUPNORM_REQUIRE_NVCC=1` makes a missing
//! nvcc a build failure instead (CI sets it). Any register spill fails the build.
//!
//! Environment:
//! - `NVCC`: path of nvcc (else `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then `PATH`)
//! - `NVCC_CCBIN`: host compiler for nvcc (`-ccbin`)
//! - `GROUPNORM_CUDA_ARCHS`: comma-separated compute capabilities, default
//!   `75,80,86,89,90,100,120`; SASS for each, PTX for the last
//! - `GROUPNORM_REQUIRE_NVCC=1`: fail instead of warn when nvcc is missing

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "75,80,86,89,90,100,120";
const ENV_VARS: &[&str] = &[
    "NVCC",
    "NVCC_CCBIN",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "GROUPNORM_CUDA_ARCHS",
    "GROUPNORM_REQUIRE_NVCC",
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in ENV_VARS {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let sources = kernel_sources(Path::new("kernels"));
    let require = env::var("GROUPNORM_REQUIRE_NVCC").is_ok_and(|v| v == "1");

    let (modules, entry_points) = match find_nvcc() {
        Some(nvcc) => compile_all(&nvcc, &sources, &out_dir),
        None if require => panic!(
            "GROUPNORM_REQUIRE_NVCC=1 but nvcc was not found (looked at $NVCC, $CUDA_HOME/bin, \
             $CUDA_PATH/bin and PATH); run scripts/install-nvcc.sh and export what it prints"
        ),
        None => {
            println!(
                "cargo::warning=nvcc not found: building groupnorm without GPU kernels (CPU path \
                 only; the GPU API will return KernelsNotBuilt). Install the CUDA toolkit or run \
                 scripts/install-nvcc.sh and set NVCC to build them."
            );
            (Vec::new(), Vec::new())
        }
    };
    write_module_table(&out_dir, &modules, &entry_points);
    // --- host emulator (cargo feature `emulate`): see build_emulator below ---
    #[cfg(feature = "emulate")]
    build_emulator(&out_dir, &sources);
}

// --- host emulator (cargo feature `emulate`) ------------------------------------------------
/// Compiles the kernels for the CPU (kernels/host_emu.h, tests/emu/) into the static library
/// `gn_emu` that `src/gpu/emulate.rs` launches them from: no GPU and no nvcc needed.
///
/// Every `kernels/*.cu` that nvcc compiles is compiled here too, each as its own C++
/// translation unit (they define helpers of the same names in namespace gn). The launch table
/// lists every `extern "C" __global__` function of the preprocessed sources (host_emu.h turns
/// `__global__` into the marker `__attribute__((used))`), so it is complete by construction.
#[cfg(feature = "emulate")]
fn build_emulator(out_dir: &Path, units: &[PathBuf]) {
    const RUNTIME: &str = "tests/emu/emu_runtime.cpp";
    // kernels that test the emulator itself (names start with `gn_emu_selftest_`)
    const SELFTEST: &str = "tests/emu/emu_selftest.cpp";
    let units: Vec<PathBuf> = units.iter().cloned().chain([SELFTEST.into()]).collect();
    let units = &units[..];
    const MARKER: &str = "extern\"C\"__attribute__((used))void";
    println!("cargo::rerun-if-changed=tests/emu");
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++20")
            .opt_level(2)
            .define("GN_HOST_EMULATION", None)
            .include("kernels")
            .include("tests/emu")
            // the kernels are .cu files: compile them (and the rest) as C++
            .flag("-x")
            .flag("c++")
            // the kernels reinterpret element arrays as 16-byte vectors, as CUDA code may
            .flag("-fno-strict-aliasing")
            // `extern __shared__` arrays are thread_local here; without this, g++ -O2 reaches
            // them through a TLS init hook that is never defined (a call to address 0)
            .flag_if_supported("-fno-extern-tls-init")
            .flag_if_supported("-Wno-unknown-pragmas")
            .warnings(true)
            .extra_warnings(true);
        b
    };
    let mut kernels: Vec<(String, String)> = Vec::new();
    for unit in units {
        let text = base()
            .file(unit)
            .try_expand()
            .unwrap_or_else(|e| panic!("emulator: preprocessing {} failed: {e}", unit.display()));
        let flat: String = String::from_utf8_lossy(&text).split_whitespace().collect();
        for rest in flat.split(MARKER).skip(1) {
            let (name, rest) = rest.split_once('(').unwrap_or_else(|| {
                panic!(
                    "emulator: unparsable kernel in {}: {rest:.80}",
                    unit.display()
                )
            });
            // (whitespace is gone: `constGnFwdParamsp)`)
            let args = rest.split(')').next().unwrap_or("");
            let Some(ty) = ["GnFwdParams", "GnBwdParams"]
                .into_iter()
                .find(|ty| args.starts_with(&format!("const{ty}")))
            else {
                panic!(
                    "emulator: kernel `{name}` in {} does not take one `const GnFwdParams` or \
                     `const GnBwdParams` (got `{args}`): extend build_emulator in build.rs",
                    unit.display()
                );
            };
            kernels.push((name.to_string(), ty.to_string()));
        }
    }
    kernels.sort();
    let before = kernels.len();
    kernels.dedup_by(|a, b| a.0 == b.0);
    assert_eq!(before, kernels.len(), "emulator: a kernel is defined twice");
    assert!(!kernels.is_empty(), "emulator: no kernels in {units:?}");

    let mut table = String::from(
        "// Generated by build.rs (build_emulator): the emulator's launch table.\n\
         #include \"params.h\"\n#include \"emu_kernels.h\"\n\n\
         template <typename P, void (*K)(const P)>\n\
         static void gn_emu_thunk(const void* p) { K(*static_cast<const P*>(p)); }\n\n",
    );
    for (name, ty) in &kernels {
        writeln!(table, "extern \"C\" void {name}(const {ty});").expect("write to String");
    }
    table.push_str("\nextern \"C\" const GnEmuKernel gn_emu_kernels[] = {\n");
    for (name, ty) in &kernels {
        writeln!(table, "    {{\"{name}\", gn_emu_thunk<{ty}, {name}>}},").expect("write");
    }
    let len = kernels.len();
    writeln!(
        table,
        "}};\nextern \"C\" const size_t gn_emu_kernels_len = {len};"
    )
    .expect("write");
    let table_path = out_dir.join("emu_table.cpp");
    fs::write(&table_path, table).expect("write emu_table.cpp");

    // The kernels (only they) are compiled with ThreadSanitizer's instrumentation but linked
    // without its run-time: every load and store they make calls a `__tsan_read*`/`__tsan_write*`
    // hook that tests/emu/emu_runtime.cpp defines, which counts global-memory traffic in the
    // buffers a caller watches (src/gpu/emulate.rs, `traffic`) and returns at once otherwise.
    let kernels = base()
        .files(units)
        .flag("-fsanitize=thread")
        .flag_if_supported("--param=tsan-instrument-func-entry-exit=0")
        .compile_intermediates();
    base()
        .objects(kernels)
        .file(RUNTIME)
        .file(&table_path)
        .try_compile("gn_emu")
        .unwrap_or_else(|e| {
            panic!("emulator: compiling the kernels for the host failed (errors above): {e}")
        });
}
// --- end host emulator ------------------------------------------------------------------------

/// Every `*.cu` file under `dir` (compiled), with a rerun trigger on each file there (headers too).
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut sources = Vec::new();
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("readable kernels/ entry").path();
        println!("cargo::rerun-if-changed={}", path.display());
        if path.extension().is_some_and(|e| e == "cu") {
            sources.push(path);
        }
    }
    sources.sort();
    sources
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            panic!("NVCC is set to {}, which is not a file", p.display());
        }
        return Some(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    })
}

fn archs() -> Vec<u32> {
    let spec = env::var("GROUPNORM_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let mut archs: Vec<u32> = spec
        .split([',', ';', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let digits = s.trim_start_matches("sm_").trim_start_matches("compute_");
            digits.parse().unwrap_or_else(|_| {
                panic!("GROUPNORM_CUDA_ARCHS: `{s}` is not a compute capability like 80 or sm_90")
            })
        })
        .collect();
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() {
        panic!("GROUPNORM_CUDA_ARCHS is empty");
    }
    archs
}

/// Compiles each source on its own thread; returns `(module name, fatbin path)` pairs and the
/// names of every entry point (from ptxas's report).
fn compile_all(
    nvcc: &Path,
    sources: &[PathBuf],
    out_dir: &Path,
) -> (Vec<(String, PathBuf)>, Vec<String>) {
    let archs = archs();
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| scope.spawn(|| compile_one(nvcc, src, out_dir, &archs)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| panic!("a kernel compile thread panicked"))
            })
            .collect()
    });
    let mut report = String::new();
    let mut failures = Vec::new();
    let mut modules = Vec::new();
    for r in results {
        match r {
            Ok((name, path, log)) => {
                report.push_str(&log);
                modules.push((name, path));
            }
            Err(msg) => failures.push(msg),
        }
    }
    fs::write(out_dir.join("ptxas-report.txt"), &report).expect("write ptxas report");
    if !failures.is_empty() {
        panic!("kernel build failed:\n\n{}", failures.join("\n\n"));
    }
    let mut names: Vec<String> = report
        .lines()
        .filter_map(|l| l.split("Compiling entry function '").nth(1))
        .filter_map(|rest| rest.split('\'').next())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    (modules, names)
}

fn compile_one(
    nvcc: &Path,
    src: &Path,
    out_dir: &Path,
    archs: &[u32],
) -> Result<(String, PathBuf, String), String> {
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("odd kernel file name {}", src.display()))?
        .to_string();
    let out = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin")
        .arg("-o")
        .arg(&out)
        .args(["-std=c++17", "-O3", "--threads", "0", "-Xptxas", "-v"])
        .args(["-Wno-deprecated-gpu-targets", "-I", "kernels"]);
    let newest = *archs.last().expect("non-empty arch list");
    for &a in archs {
        let code = if a == newest {
            format!("[sm_{a},compute_{a}]")
        } else {
            format!("sm_{a}")
        };
        cmd.arg("-gencode")
            .arg(format!("arch=compute_{a},code={code}"));
    }
    if let Some(ccbin) = env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    cmd.arg(src);
    let shown = format!("{cmd:?}");
    let output = cmd
        .output()
        .map_err(|e| format!("could not run nvcc ({e}):\n  {shown}"))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {} ({}):\n  {shown}\n{log}",
            src.display(),
            output.status
        ));
    }
    let spills = find_spills(&log);
    if !spills.is_empty() {
        return Err(format!(
            "register spills in {} (the build refuses spilling kernels: lower the per-thread \
             tile or raise __launch_bounds__' register budget):\n{}",
            src.display(),
            spills.join("\n")
        ));
    }
    Ok((stem, out, log))
}

/// Lines naming `kernel for sm_XX: N bytes spill stores, M bytes spill loads` with N or M > 0.
fn find_spills(log: &str) -> Vec<String> {
    let mut current = String::new();
    let mut spills = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest
                .replace("' for '", " for ")
                .trim_end_matches('\'')
                .to_string();
        }
        if line.contains("spill stores") {
            let nonzero = line
                .split(',')
                .filter(|part| part.contains("spill"))
                .any(|part| part.trim().split(' ').next().is_some_and(|n| n != "0"));
            if nonzero {
                spills.push(format!("  {current}: {}", line.trim()));
            }
        }
    }
    spills
}

fn write_module_table(out_dir: &Path, modules: &[(String, PathBuf)], entry_points: &[String]) {
    let mut src = String::from(
        "/// Fatbins compiled from `kernels/*.cu` by build.rs: (module name, image).\n\
         pub(crate) static MODULES: &[(&str, &[u8])] = &[\n",
    );
    for (name, path) in modules {
        writeln!(
            src,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .expect("write to String");
    }
    src.push_str("];\n");
    let archs = if modules.is_empty() {
        String::new()
    } else {
        archs()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    writeln!(
        src,
        "/// Compute capabilities with SASS in the fatbins (the last also as PTX); empty without nvcc.\n\
         pub(crate) static ARCHS: &str = {archs:?};"
    )
    .expect("write to String");
    writeln!(
        src,
        "/// Every kernel entry point in the fatbins.\n\
         #[allow(dead_code)]\n\
         pub(crate) static ENTRY_POINTS: &[&str] = &{entry_points:?};"
    )
    .expect("write to String");
    fs::write(out_dir.join("kernels.rs"), src).expect("write kernels.rs");
}
