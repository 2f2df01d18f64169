//! Static counts from the SASS of the embedded fatbins: registers, local memory, static shared
//! memory, the width of every global access, and instructions per element in the innermost
//! loops. cuobjdump and nvdisasm come from scripts/install-nvcc.sh (`CUOBJDUMP`).
//!
//! Loops: a branch (`BRA`, predicated or not) to a lower address closes a loop whose body runs
//! from the target to the branch, both included, except the branch that ends a `BRA.DIV` stub
//! (the out-of-line path a diverged warp takes to a shuffle) and returns into the code it left. The innermost loops are those with no other
//! loop inside. Elements per iteration: the 16-byte loads in the body (global `LDG`, generic `LD`
//! or shared `LDS`) times the elements of a 16-byte vector of the kernel's dtype, divided by the
//! tensors the kernel reads per element (2 for the backward row kernels, x and dy; else 1).
//! Loops without a 16-byte load (scalar kernels, reductions over a few values) get no
//! per-element figure. The method is checked on a grid-stride float4 copy whose loop is known
//! (tests below).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The architectures the report lists.
pub const ARCHS: [u32; 3] = [80, 90, 100];

/// One kernel's SASS on one architecture.
#[derive(Clone, Debug, Default)]
pub struct Function {
    /// `(offset, instruction text without predicate-free whitespace)`.
    pub code: Vec<(u32, String)>,
    /// Registers per thread.
    pub regs: u32,
    /// Stack bytes per thread.
    pub stack: u32,
    /// Local memory bytes per thread (spills and local arrays).
    pub local: u32,
    /// Static shared memory, bytes.
    pub shared: u32,
}

/// Global (`LDG`/`STG`) and generic (`LD`/`ST`) accesses by width.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Widths {
    /// 128-bit accesses.
    pub wide: u32,
    /// Narrower accesses.
    pub narrow: u32,
}

/// One innermost loop.
#[derive(Clone, Debug, PartialEq)]
pub struct Loop {
    /// First instruction (the branch target).
    pub start: u32,
    /// Instructions in the body, NOPs aside.
    pub instrs: u32,
    /// 16-byte loads (global, generic or shared).
    pub loads16: u32,
    /// Global and generic accesses narrower than 128 bits in the body.
    pub narrow_global: u32,
    /// Elements one iteration handles per thread (None without 16-byte loads).
    pub elems: Option<f64>,
}

fn opcode(text: &str) -> &str {
    let t = text.trim_start();
    let t = if t.starts_with('@') {
        t.split_once(' ').map_or("", |(_, r)| r.trim_start())
    } else {
        t
    };
    t.split_whitespace().next().unwrap_or("")
}

/// Whether `op` is a global or generic load or store, and whether it is 128 bits wide.
fn global_access(op: &str) -> Option<bool> {
    let base = op.split('.').next().unwrap_or("");
    if !matches!(base, "LDG" | "STG" | "LD" | "ST") {
        return None;
    }
    Some(op.split('.').any(|m| m == "128"))
}

fn is_load16(op: &str) -> bool {
    let base = op.split('.').next().unwrap_or("");
    matches!(base, "LDG" | "LD" | "LDS") && op.split('.').any(|m| m == "128")
}

impl Function {
    /// Widths of every global and generic access in the kernel.
    pub fn widths(&self) -> Widths {
        let mut w = Widths::default();
        for (_, t) in &self.code {
            match global_access(opcode(t)) {
                Some(true) => w.wide += 1,
                Some(false) => w.narrow += 1,
                None => {}
            }
        }
        w
    }

    /// The innermost loops; `vec_elems`: elements of a 16-byte vector; `tensors`: tensors read
    /// per element.
    pub fn innermost_loops(&self, vec_elems: u32, tensors: u32) -> Vec<Loop> {
        let target_of = |t: &str| {
            t.split_whitespace()
                .find_map(|w| w.trim_end_matches(';').strip_prefix("0x"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
        };
        // A warp shuffle the compiler cannot prove convergent gets `BRA.DIV` to an out-of-line
        // stub (WARPSYNC.COLLECTIVE, the shuffle again) that ends in an unconditional `BRA`
        // back to just after the `BRA.DIV`. That branch returns from a side exit taken only by
        // a diverged warp; it closes no loop, so it is left out.
        let mut stub_returns = Vec::new();
        for (off, t) in &self.code {
            if opcode(t) != "BRA.DIV" {
                continue;
            }
            let Some(stub) = target_of(t).filter(|&x| x > *off) else {
                continue;
            };
            let back = self.code.iter().find(|(o, t2)| {
                *o >= stub && !t2.trim_start().starts_with('@') && opcode(t2) == "BRA"
            });
            if let Some((o, t2)) = back {
                if target_of(t2).is_some_and(|x| x > *off && x < stub) {
                    stub_returns.push(*o);
                }
            }
        }
        let mut loops: Vec<(u32, u32)> = Vec::new();
        for (off, t) in &self.code {
            let op = opcode(t);
            if op.split('.').next() != Some("BRA") || stub_returns.contains(off) {
                continue;
            }
            if let Some(target) = target_of(t).filter(|&x| x < *off) {
                loops.push((target, *off));
            }
        }
        let inner: Vec<(u32, u32)> = loops
            .iter()
            .copied()
            .filter(|&(s, e)| {
                !loops
                    .iter()
                    .any(|&(s2, e2)| (s2, e2) != (s, e) && s <= s2 && e2 <= e)
            })
            .collect();
        inner
            .into_iter()
            .map(|(s, e)| {
                let body: Vec<&str> = self
                    .code
                    .iter()
                    .filter(|(o, _)| *o >= s && *o <= e)
                    .map(|(_, t)| opcode(t))
                    .filter(|op| *op != "NOP")
                    .collect();
                let loads16 = body.iter().filter(|op| is_load16(op)).count() as u32;
                let narrow_global = body
                    .iter()
                    .filter(|op| global_access(op) == Some(false))
                    .count() as u32;
                Loop {
                    start: s,
                    instrs: body.len() as u32,
                    loads16,
                    narrow_global,
                    elems: (loads16 > 0)
                        .then(|| (loads16 * vec_elems) as f64 / tensors.max(1) as f64),
                }
            })
            .collect()
    }
}

/// Runs cuobjdump on a fatbin or cubin: `(arch, function name) -> Function`.
pub fn disassemble(
    cuobjdump: &Path,
    file: &Path,
) -> Result<BTreeMap<(u32, String), Function>, String> {
    let run = |flag: &str| -> Result<String, String> {
        let dir = cuobjdump.parent().map(PathBuf::from).unwrap_or_default();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![dir];
        paths.extend(std::env::split_paths(&path));
        let out = Command::new(cuobjdump)
            .arg(flag)
            .arg(file)
            .env(
                "PATH",
                std::env::join_paths(paths).map_err(|e| e.to_string())?,
            )
            .output()
            .map_err(|e| format!("running {}: {e}", cuobjdump.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} {flag} failed: {}",
                cuobjdump.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut fns: BTreeMap<(u32, String), Function> = BTreeMap::new();
    let arch_of = |line: &str| -> Option<u32> {
        line.split("sm_").nth(1).and_then(|r| {
            r.chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .ok()
        })
    };
    let mut arch = 0;
    let mut current: Option<(u32, String)> = None;
    for line in run("-sass")?.lines() {
        let t = line.trim();
        if t.starts_with("code for sm_") {
            arch = arch_of(t).unwrap_or(0);
        } else if let Some(name) = t.strip_prefix("Function : ") {
            let key = (arch, name.trim().to_string());
            fns.entry(key.clone()).or_default();
            current = Some(key);
        } else if let (Some(rest), Some(key)) = (t.strip_prefix("/*"), current.as_ref()) {
            let Some((off, text)) = rest.split_once("*/") else {
                continue;
            };
            let Ok(off) = u32::from_str_radix(off, 16) else {
                continue;
            };
            let text = text
                .split("/*")
                .next()
                .unwrap_or("")
                .trim()
                .trim_end_matches(';')
                .trim();
            if !text.is_empty() {
                fns.get_mut(key)
                    .expect("function")
                    .code
                    .push((off, text.to_string()));
            }
        }
    }
    let mut arch = 0;
    let mut name = String::new();
    for line in run("-res-usage")?.lines() {
        let t = line.trim();
        if t.starts_with("arch = sm_") {
            arch = arch_of(t).unwrap_or(0);
        } else if let Some(n) = t.strip_prefix("Function ") {
            name = n.trim_end_matches(':').to_string();
        } else if t.starts_with("REG:") {
            if let Some(f) = fns.get_mut(&(arch, name.clone())) {
                for field in t.split_whitespace() {
                    let Some((k, v)) = field.split_once(':') else {
                        continue;
                    };
                    let v: u32 = v.parse().unwrap_or(0);
                    match k {
                        "REG" => f.regs = v,
                        "STACK" => f.stack = v,
                        "LOCAL" => f.local = v,
                        "SHARED" => f.shared = v,
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(fns)
}

/// The cuobjdump to use: `CUOBJDUMP`, else `cuobjdump` on PATH.
pub fn cuobjdump() -> PathBuf {
    std::env::var_os("CUOBJDUMP").map_or_else(|| PathBuf::from("cuobjdump"), PathBuf::from)
}

/// Every kernel of the embedded fatbins, on the report's architectures.
pub fn embedded() -> Result<BTreeMap<(u32, String), Function>, String> {
    let fatbins = groupnorm::gpu::runtime::embedded_fatbins();
    if fatbins.is_empty() {
        return Err("this build carries no kernels (build with NVCC set)".into());
    }
    let built: Vec<u32> = groupnorm::gpu::built_archs()
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    if let Some(a) = ARCHS.iter().find(|a| !built.contains(a)) {
        return Err(format!(
            "the kernels were built for {built:?}, without sm_{a} (set GROUPNORM_CUDA_ARCHS to \
             include 80, 90 and 100)"
        ));
    }
    let dir = std::env::temp_dir().join(format!("kernel-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut all = BTreeMap::new();
    let result = (|| {
        for (name, image) in fatbins {
            let file = dir.join(format!("{name}.fatbin"));
            std::fs::write(&file, image).map_err(|e| e.to_string())?;
            for (k, f) in disassemble(&cuobjdump(), &file)? {
                if ARCHS.contains(&k.0) {
                    all.insert(k, f);
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| all)
}

/// Elements of a 16-byte vector and bytes per element of a kernel, from its name
/// (`groupnorm_<kind>_<T>[_<P>][_vec|_scalar]`: the first dtype is the activations').
pub fn dtype_of(name: &str) -> (u32, u32) {
    match name
        .split('_')
        .find(|p| matches!(*p, "f32" | "f16" | "bf16"))
    {
        Some("f32") => (4, 4),
        _ => (8, 2),
    }
}

/// Tensors a kernel reads per element: x and dy for the backward row kernels.
pub fn tensors_of(name: &str) -> u32 {
    let backward_rows = [
        "bwd_fused",
        "bwd_partial",
        "bwd_dx",
        "cluster_bwd",
        "nhwc_bwd",
    ];
    if backward_rows.iter().any(|k| name.contains(k)) {
        2
    } else {
        1
    }
}

/// Thread instructions per element under which the SM's issue rate stays below half at `dev`'s
/// copy speed: half of 128 thread instructions per cycle, over the elements the SM must move
/// per cycle (`bytes_per_elem` of traffic each).
pub fn instr_budget(copy_gbs: u32, sms: u32, clock_mhz: u32, bytes_per_elem: u32) -> f64 {
    let bytes_per_cycle = copy_gbs as f64 * 1e9 / (sms as f64 * clock_mhz as f64 * 1e6);
    64.0 * bytes_per_elem as f64 / bytes_per_cycle
}

/// The SASS section and its budget lines (`(budget, subject, figure, pass)`).
pub fn section(
    s: &mut String,
    fns: &BTreeMap<(u32, String), Function>,
) -> Vec<(String, String, String, bool)> {
    let h200 = crate::devices::by_key("h200").expect("h200");
    let mut budgets = Vec::new();
    let _ = writeln!(
        s,
        "## SASS (static counts from the embedded fatbins; cuobjdump/nvdisasm 13.2.51)\n\n\
         Per kernel and architecture: registers, stack and local memory per thread (local > 0: \
         spills or local arrays), static shared memory (the registers enter the blocks per SM \
         of the plan tables below), global and generic loads and stores by width, and each innermost loop: instructions, 16-byte loads, elements per thread and \
         iteration, instructions per element. Method: see the module documentation of \
         tools/kernel-report/src/sass.rs (backward branches close loops), checked on a \
         grid-stride float4 copy in its tests. Instruction budget (per pass and dtype, from the \
         H200 figures of the device table): half of the SM's 128 thread instructions per cycle \
         over the elements it must move per cycle at copy speed, held against the kernel's \
         costliest loop (a kernel holds alternatives, e.g. with and without SiLU, whose loops \
         do not all run in one call; one loop alone is a lower bound on the cost of a call that \
         runs it). Narrow accesses are counted in the loops with 16-byte loads only (tails \
         and reductions aside).\n"
    );
    s.push_str(
        "| kernel | sm | regs | stack | local | static smem | 128-bit / narrower global | loops: instrs, 16-B loads, elems, instr/elem |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for ((arch, name), f) in fns {
        let (vec_elems, elem_bytes) = dtype_of(name);
        let loops = f.innermost_loops(vec_elems, tensors_of(name));
        let w = f.widths();
        let cells: Vec<String> = loops
            .iter()
            .map(|l| match l.elems {
                Some(e) => format!(
                    "{} @{:#x}: {} instr, {} ld16, {e} el, {:.2}/el",
                    "loop",
                    l.start,
                    l.instrs,
                    l.loads16,
                    l.instrs as f64 / e
                ),
                None => format!("loop @{:#x}: {} instr, no 16-B load", l.start, l.instrs),
            })
            .collect();
        let _ = writeln!(
            s,
            "| {} | {arch} | {} | {} | {} | {} | {} / {} | {} |",
            name.trim_start_matches("groupnorm_"),
            f.regs,
            f.stack,
            f.local,
            f.shared,
            w.wide,
            w.narrow,
            if cells.is_empty() {
                "no loop".to_string()
            } else {
                cells.join("; ")
            }
        );
        let subject = format!("{} sm_{arch}", name.trim_start_matches("groupnorm_"));
        budgets.push((
            "no spills (local memory 0)".to_string(),
            subject.clone(),
            format!("{} B local, {} B stack", f.local, f.stack),
            f.local == 0,
        ));
        if name.ends_with("_vec") {
            // steady-state loops: those with 16-byte loads (tails and reductions aside)
            let narrow: u32 = loops
                .iter()
                .filter(|l| l.elems.is_some())
                .map(|l| l.narrow_global)
                .sum();
            budgets.push((
                "no global access < 128 bits in a vector kernel's steady-state loops".to_string(),
                subject.clone(),
                format!("{narrow} narrower"),
                narrow == 0,
            ));
            let bytes = elem_bytes * (1 + tensors_of(name));
            let budget = instr_budget(h200.copy_gbs, h200.sms, h200.clock_mhz, bytes);
            if let (90, Some(worst)) = (*arch, costliest(&loops)) {
                budgets.push((
                    format!("instructions/element <= {budget:.1} ({bytes} B/element)"),
                    subject,
                    format!("{worst:.2} (costliest loop)"),
                    worst <= budget,
                ));
            }
        }
    }
    s.push('\n');
    budgets
}

/// The instructions per element of the costliest innermost loop with a per-element figure.
/// A kernel holds alternatives (with and without SiLU, per-channel or per-group weights) whose
/// loops do not all run in one call, so loops are not summed: the costliest loop alone is a
/// lower bound on the cost per element of every call that runs it.
pub fn costliest(loops: &[Loop]) -> Option<f64> {
    loops
        .iter()
        .filter_map(|l| l.elems.map(|e| l.instrs as f64 / e))
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
}

/// Thread instructions per element of each kernel on `arch`: its costliest loop
/// ([`costliest`]).
pub fn per_element(fns: &BTreeMap<(u32, String), Function>, arch: u32) -> BTreeMap<String, f64> {
    fns.iter()
        .filter(|((a, _), _)| *a == arch)
        .filter_map(|((_, name), f)| {
            let (vec_elems, _) = dtype_of(name);
            costliest(&f.innermost_loops(vec_elems, tensors_of(name))).map(|c| (name.clone(), c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The method on kernels whose answer is known: a grid-stride copy of float4 (one 128-bit
    /// load and store per iteration, 4 f32 elements) and of float (32-bit accesses).
    #[test]
    fn finds_the_loop_of_a_known_kernel() {
        let Some(nvcc) = std::env::var_os("NVCC") else {
            eprintln!("NVCC not set: the SASS method test needs nvcc and cuobjdump (scripts/install-nvcc.sh)");
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run this test with NVCC set"
            );
            return;
        };
        let dir = std::env::temp_dir().join(format!("kernel-report-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("k.cu");
        std::fs::write(
            &src,
            "extern \"C\" __global__ void copy4(const float4* __restrict__ x, float4* __restrict__ y, int n) {\n\
               for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = x[i];\n\
             }\n\
             extern \"C\" __global__ void copy1(const float* __restrict__ x, float* __restrict__ y, int n) {\n\
               for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = x[i];\n\
             }\n",
        )
        .unwrap();
        let out = dir.join("k.fatbin");
        let st = Command::new(nvcc)
            .args([
                "--fatbin",
                "-O3",
                "-gencode",
                "arch=compute_90,code=sm_90",
                "-o",
            ])
            .arg(&out)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success());
        let fns = disassemble(&cuobjdump(), &out).unwrap();
        let f4 = &fns[&(90, "copy4".to_string())];
        assert_eq!(f4.widths(), Widths { wide: 2, narrow: 0 });
        let loops = f4.innermost_loops(4, 1);
        assert_eq!(loops.len(), 1, "{:#?}", f4.code);
        let l = &loops[0];
        assert_eq!((l.loads16, l.narrow_global, l.elems), (1, 0, Some(4.0)));
        // address, load, store, index step, compare, branch at the least; a handful more at most
        assert!((6..=10).contains(&l.instrs), "{l:?}");
        assert!(f4.regs > 0 && f4.local == 0);
        let f1 = &fns[&(90, "copy1".to_string())];
        assert_eq!(f1.widths().wide, 0);
        assert!(f1.widths().narrow >= 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The return branch of a `BRA.DIV` stub closes no loop; the loop around the shuffle is found
    /// with its own body only.
    #[test]
    fn divergence_stubs_close_no_loop() {
        let code = [
            (0x00, "MOV R1, RZ"),
            (0x10, "LDS.128 R4, [R2]"),
            (0x20, "BRA.DIV UR4, 0x80"),
            (0x30, "SHFL.IDX PT, R8, R9, R10, 0x1f"),
            (0x40, "STG.E.128 desc[UR6][R12.64], R4"),
            (0x50, "ISETP.GE.U32.AND P0, PT, R1, R3, PT"),
            (0x60, "@!P0 BRA 0x10"),
            (0x70, "EXIT"),
            (0x80, "BSSY B1, 0xb0"),
            (0x90, "WARPSYNC.COLLECTIVE R13, 0xa0"),
            (0xa0, "SHFL.IDX P0, R8, R9, R10, R11"),
            (0xb0, "BSYNC B1"),
            (0xc0, "BRA 0x40"),
        ];
        let f = Function {
            code: code.iter().map(|(o, t)| (*o, t.to_string())).collect(),
            ..Function::default()
        };
        let loops = f.innermost_loops(8, 1);
        assert_eq!(loops.len(), 1, "{loops:?}");
        assert_eq!(
            (loops[0].start, loops[0].instrs, loops[0].loads16),
            (0x10, 6, 1)
        );
    }

    #[test]
    fn names_give_dtypes_and_tensors() {
        assert_eq!(dtype_of("groupnorm_fwd_fused_f16_f32_vec"), (8, 2));
        assert_eq!(dtype_of("groupnorm_fwd_fused_f32_f32_vec"), (4, 4));
        assert_eq!(dtype_of("groupnorm_fwd_partial_bf16_vec"), (8, 2));
        assert_eq!(dtype_of("groupnorm_fwd_partial_f32_vec"), (4, 4));
        assert_eq!(tensors_of("groupnorm_bwd_dx_f16_f32_vec"), 2);
        assert_eq!(tensors_of("groupnorm_fwd_apply_f16_f32_vec"), 1);
        // the figure: H200 at 4.3 TB/s, f16 forward: about 15 at half issue
        let b = instr_budget(4300, 132, 1980, 4);
        assert!((14.0..17.0).contains(&b), "{b}");
    }
}
