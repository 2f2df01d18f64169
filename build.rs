//! Compiles `kernels/*.cu` into fatbins (SASS for every target architecture plus PTX for the
//! newest) and writes `$OUT_DIR/kernels.rs`, which embeds them with `include_bytes!`.
//!
//! Cargo features:
//! - `cuda` (default): build the kernels. nvcc 12.4 or newer is required; a missing or older
//!   nvcc stops the build with what to do, except on docs.rs (`DOCS_RS` set), which has no nvcc.
//! - without `cuda` (`--no-default-features`): the deliberate CPU-only build; nvcc is not looked
//!   for, `kernels.rs` embeds nothing and the GPU API returns `Error::KernelsNotBuilt`.
//! - `bench`: also embed the benchmark-only unfused baseline (`kernels/baseline.cu`).
//!
//! Any register spill fails the build. Which architectures were embedded, and how many bytes,
//! is printed as a cargo warning (shown for workspace and path builds; `-vv` shows it always).
//!
//! Environment:
//! - `NVCC`: path of nvcc (else `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then `PATH`)
//! - `NVCC_CCBIN`: host compiler for nvcc (`-ccbin`)
//! - `GROUPNORM_CUDA_ARCHS`: comma-separated compute capabilities (`90`, `sm_90`, `9.0`); else
//!   `CUDA_COMPUTE_CAP` (the variable candle's build reads); else the default
//!   `75,80,86,89,90,100,120`, less what this nvcc cannot target (`nvcc --list-gpu-arch`; sm_100
//!   and sm_120 need 12.8). An architecture asked for by name that nvcc cannot target is an
//!   error. SASS for each, PTX for the newest.
//! - `GROUPNORM_KERNEL_CACHE`: a directory where compiled fatbins (and ptxas' report) are kept,
//!   keyed by a hash of the nvcc command line, nvcc's path and version, and every file under
//!   `kernels/`. Off by default. Each feature set and profile of the crate runs this script
//!   anew, and nvcc for the seven default architectures takes about three minutes on two cores;
//!   CI and local work across feature sets set it so that nvcc runs once per kernel change.
//!   The spill check reads the cached report as it would a fresh one.
//! - `GROUPNORM_REQUIRE_NVCC=1`: kept for older scripts; with the `cuda` feature a missing nvcc
//!   is an error anyway, and this makes it one on docs.rs too.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "75,80,86,89,90,100,120";
/// The oldest nvcc the kernels are built and tested with (CI compiles them with 12.4 and 13.0).
const MIN_NVCC: (u32, u32) = (12, 4);
const ENV_VARS: &[&str] = &[
    "NVCC",
    "NVCC_CCBIN",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "GROUPNORM_CUDA_ARCHS",
    "CUDA_COMPUTE_CAP",
    "GROUPNORM_REQUIRE_NVCC",
    "GROUPNORM_KERNEL_CACHE",
    "DOCS_RS",
];
/// What to do when nvcc is missing or too old (the build stops with this).
const HOW_TO_GET_NVCC: &str = "install the CUDA toolkit 12.4 or newer and set NVCC (or CUDA_HOME, \
     or put nvcc on PATH); without a toolkit, the pinned CUDA 13.0 nvcc from PyPI serves (kernels \
     for CUDA 13 drivers): `pip install --no-deps --target DIR nvidia-cuda-nvcc==13.0.88 \
     nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
     nvidia-cuda-runtime==13.0.88` and NVCC=DIR/nvidia/cu13/bin/nvcc (the groupnorm README, \
     \"Building the kernels\"); or build CPU-only on purpose with `default-features = false` \
     (cargo --no-default-features), where the GPU API returns KernelsNotBuilt";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in ENV_VARS {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let sources = kernel_sources(Path::new("kernels"));
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let bench = env::var_os("CARGO_FEATURE_BENCH").is_some();
    let require = env::var("GROUPNORM_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let docs_rs = env::var_os("DOCS_RS").is_some() && !require;
    // the benchmark-only baseline kernels only with the `bench` feature
    let gpu_sources: Vec<PathBuf> = sources
        .iter()
        .filter(|p| bench || p.file_name().is_none_or(|n| n != "baseline.cu"))
        .cloned()
        .collect();

    let (modules, entry_points, archs) = if !cuda {
        (Vec::new(), Vec::new(), Vec::new())
    } else {
        match find_nvcc() {
            Some(nvcc) => {
                let version = nvcc_version(&nvcc);
                if version < MIN_NVCC {
                    fail(&format!(
                        "{} is CUDA {}.{}; groupnorm's kernels need nvcc {}.{} or newer: {HOW_TO_GET_NVCC}",
                        nvcc.display(),
                        version.0,
                        version.1,
                        MIN_NVCC.0,
                        MIN_NVCC.1
                    ));
                }
                let archs = archs(&nvcc);
                let cache = KernelCache::from_env(&nvcc, version, Path::new("kernels"));
                let (modules, names) =
                    compile_all(&nvcc, &gpu_sources, &out_dir, &archs, cache.as_ref());
                report_embedded(&modules, &archs, version, cache.as_ref());
                (modules, names, archs)
            }
            None if docs_rs => (Vec::new(), Vec::new(), Vec::new()),
            None => fail(&format!(
                "nvcc not found (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin and PATH), and the \
                 `cuda` feature (default) builds the GPU kernels: {HOW_TO_GET_NVCC}"
            )),
        }
    };
    write_module_table(&out_dir, &modules, &entry_points, &archs);
    // --- host emulator: see build_emulator below ---
    #[cfg(feature = "emulate")]
    build_emulator(&out_dir, &sources);
}

/// Stops the build with `msg` (a panic in a build script: Cargo prints it in full, also for a
/// registry dependency, where it hides cargo warnings).
fn fail(msg: &str) -> ! {
    panic!("groupnorm: {msg}")
}

/// `(major, minor)` from `nvcc --version` (`... release 12.4, V12.4.131`).
fn nvcc_version(nvcc: &Path) -> (u32, u32) {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {} --version: {e}", nvcc.display())));
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed = text.split("release ").nth(1).and_then(|rest| {
        let v = rest.split(',').next()?.trim();
        let (major, minor) = v.split_once('.')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    });
    parsed.unwrap_or_else(|| {
        fail(&format!(
            "cannot read the CUDA version from `{} --version`:\n{text}",
            nvcc.display()
        ))
    })
}

/// The compute capabilities this nvcc can generate code for (`nvcc --list-gpu-arch`:
/// `compute_75` ...).
fn nvcc_archs(nvcc: &Path) -> Vec<u32> {
    let out = Command::new(nvcc)
        .arg("--list-gpu-arch")
        .output()
        .unwrap_or_else(|e| {
            fail(&format!(
                "cannot run {} --list-gpu-arch: {e}",
                nvcc.display()
            ))
        });
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("compute_")?.parse().ok())
        .collect()
}

/// Prints what went into the binary: architectures, PTX, bytes.
fn report_embedded(
    modules: &[(String, PathBuf)],
    archs: &[u32],
    version: (u32, u32),
    cache: Option<&KernelCache>,
) {
    let bytes: u64 = modules
        .iter()
        .map(|(_, p)| fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let names: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    let sass: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
    let cached = match cache {
        Some(c) => format!(
            "; kernel cache {}: {} of {} modules found there",
            c.dir.display(),
            c.hits.load(std::sync::atomic::Ordering::Relaxed),
            modules.len()
        ),
        None => String::new(),
    };
    println!(
        "cargo::warning=groupnorm GPU kernels (nvcc {}.{}): SASS for {}, PTX for compute_{}; \
         {} modules ({}), {:.1} MiB embedded{cached}",
        version.0,
        version.1,
        sass.join(","),
        archs.last().copied().unwrap_or(0),
        modules.len(),
        names.join(", "),
        bytes as f64 / (1024.0 * 1024.0)
    );
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

/// Compute capabilities from `spec` (`80`, `sm_90`, `compute_90`, `8.9`; comma, semicolon or
/// space separated), sorted and deduplicated; `var` names the variable in errors.
fn parse_archs(var: &str, spec: &str) -> Vec<u32> {
    let mut archs: Vec<u32> = spec
        .split([',', ';', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let digits = s
                .trim_start_matches("sm_")
                .trim_start_matches("compute_")
                .replace('.', "");
            digits.parse().unwrap_or_else(|_| {
                fail(&format!(
                    "{var}: `{s}` is not a compute capability like 80, 8.9 or sm_90"
                ))
            })
        })
        .collect();
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() {
        fail(&format!("{var} is set but empty"));
    }
    archs
}

/// The architectures to build: `GROUPNORM_CUDA_ARCHS`, else `CUDA_COMPUTE_CAP`, else the default
/// list less what this nvcc cannot target. Named architectures nvcc cannot target are an error.
fn archs(nvcc: &Path) -> Vec<u32> {
    let supported = nvcc_archs(nvcc);
    let named = ["GROUPNORM_CUDA_ARCHS", "CUDA_COMPUTE_CAP"]
        .into_iter()
        .find_map(|var| env::var(var).ok().map(|spec| (var, spec)));
    if let Some((var, spec)) = named {
        let archs = parse_archs(var, &spec);
        let missing: Vec<String> = archs
            .iter()
            .filter(|a| !supported.is_empty() && !supported.contains(a))
            .map(|a| format!("sm_{a}"))
            .collect();
        if !missing.is_empty() {
            fail(&format!(
                "{var}={spec} asks for {}, which {} cannot target (it lists compute_{}); use a \
                 newer CUDA toolkit (sm_100 and sm_120 need 12.8+) or drop them",
                missing.join(", "),
                nvcc.display(),
                supported
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",compute_")
            ));
        }
        return archs;
    }
    let default = parse_archs("the default architecture list", DEFAULT_ARCHS);
    let archs: Vec<u32> = default
        .iter()
        .copied()
        .filter(|a| supported.is_empty() || supported.contains(a))
        .collect();
    if archs.is_empty() {
        fail(&format!(
            "{} can target none of the default architectures {DEFAULT_ARCHS}",
            nvcc.display()
        ));
    }
    archs
}

/// Compiles each source on its own thread; returns `(module name, fatbin path)` pairs and the
/// names of every entry point (from ptxas's report).
fn compile_all(
    nvcc: &Path,
    sources: &[PathBuf],
    out_dir: &Path,
    archs: &[u32],
    cache: Option<&KernelCache>,
) -> (Vec<(String, PathBuf)>, Vec<String>) {
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| scope.spawn(|| compile_one(nvcc, src, out_dir, archs, cache)))
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
        fail(&format!(
            "kernel build failed:\n\n{}",
            failures.join("\n\n")
        ));
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
    cache: Option<&KernelCache>,
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
    // the key: everything on the command line but the output path (the sources' contents are
    // in the cache's own key)
    let key_args: Vec<String> = cmd
        .get_args()
        .filter(|a| *a != out.as_os_str())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let log = match cache.and_then(|c| c.get(&key_args, &out)) {
        Some(log) => log,
        None => {
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
            if let Some(c) = cache {
                c.put(&key_args, &out, &log);
            }
            log
        }
    };
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

/// `GROUPNORM_KERNEL_CACHE`: fatbins and ptxas logs kept across runs of this script.
///
/// An entry is `<key>.fatbin` plus `<key>.log`, written to temporary names and renamed (a
/// concurrent build sees a whole entry or none). The key is a 128-bit FNV-1a hash of the nvcc
/// path and version, the names and contents of every file under `kernels/`, and the command
/// line (architectures, `-ccbin`). A miss or an unreadable entry compiles as if there were no
/// cache.
struct KernelCache {
    dir: PathBuf,
    /// the hash of everything but the command line
    base: u128,
    hits: std::sync::atomic::AtomicUsize,
}

impl KernelCache {
    fn from_env(nvcc: &Path, version: (u32, u32), kernels_dir: &Path) -> Option<Self> {
        let dir = PathBuf::from(env::var_os("GROUPNORM_KERNEL_CACHE").filter(|v| !v.is_empty())?);
        fs::create_dir_all(&dir).unwrap_or_else(|e| {
            fail(&format!(
                "GROUPNORM_KERNEL_CACHE={}: cannot create it: {e}",
                dir.display()
            ))
        });
        let mut h = Fnv128::new();
        h.write(nvcc.as_os_str().as_encoded_bytes());
        h.write(format!("{}.{}", version.0, version.1).as_bytes());
        // every file of kernels/ (headers too), in name order
        let mut files: Vec<PathBuf> = fs::read_dir(kernels_dir)
            .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            h.write(f.as_os_str().as_encoded_bytes());
            h.write(&fs::read(&f).unwrap_or_else(|e| fail(&format!("read {}: {e}", f.display()))));
        }
        Some(Self {
            dir,
            base: h.finish(),
            hits: Default::default(),
        })
    }

    fn entry(&self, args: &[String]) -> PathBuf {
        let mut h = Fnv128 { state: self.base };
        for a in args {
            h.write(a.as_bytes());
        }
        self.dir.join(format!("{:032x}", h.finish()))
    }

    /// Copies a cached fatbin to `out` and returns its ptxas log, or `None` on a miss.
    fn get(&self, args: &[String], out: &Path) -> Option<String> {
        let entry = self.entry(args);
        let log = fs::read_to_string(entry.with_extension("log")).ok()?;
        fs::copy(entry.with_extension("fatbin"), out).ok()?;
        self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(log)
    }

    /// Stores a fresh compile; a failure to store is only a lost cache entry.
    fn put(&self, args: &[String], fatbin: &Path, log: &str) {
        let entry = self.entry(args);
        let tmp = |ext: &str| entry.with_extension(format!("{ext}.tmp{}", std::process::id()));
        let (tf, tl) = (tmp("fatbin"), tmp("log"));
        // the fatbin first: an entry counts once its log exists
        let stored = fs::copy(fatbin, &tf).is_ok()
            && fs::rename(&tf, entry.with_extension("fatbin")).is_ok()
            && fs::write(&tl, log).is_ok()
            && fs::rename(&tl, entry.with_extension("log")).is_ok();
        if !stored {
            let _ = fs::remove_file(tf);
            let _ = fs::remove_file(tl);
        }
    }
}

/// 128-bit FNV-1a, with each field followed by its length (so that field boundaries count).
struct Fnv128 {
    state: u128,
}

impl Fnv128 {
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    fn new() -> Self {
        Self {
            state: 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d,
        }
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().chain(&(bytes.len() as u64).to_le_bytes()) {
            self.state ^= u128::from(b);
            self.state = self.state.wrapping_mul(Self::PRIME);
        }
    }
    fn finish(&self) -> u128 {
        self.state
    }
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

fn write_module_table(
    out_dir: &Path,
    modules: &[(String, PathBuf)],
    entry_points: &[String],
    archs: &[u32],
) {
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
        archs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    writeln!(
        src,
        "/// Compute capabilities with SASS in the fatbins (the last also as PTX); empty without kernels.\n\
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
