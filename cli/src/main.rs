//! The `groupnorm` command.
//!
//! ```text
//! groupnorm demo     worked examples and a Stable Diffusion shape, GPU when present, CPU otherwise
//! groupnorm bench    timings, GB/s and % of copy bandwidth, beside an unfused baseline
//! groupnorm check    randomized parity with the f64 reference
//! groupnorm apply    forward on .npy files
//! groupnorm grad     backward on .npy files
//! groupnorm info     what this binary and machine can do (kernels, driver, device)
//! ```
//!
//! Results go to stdout, progress and errors to stderr. Exit codes: 0 success, 1 a result missed
//! its accuracy target or the machine cannot run the request (no GPU), 2 bad input.

mod args;
mod bench;
mod check;
mod demo;
mod files;
mod npy;
mod shapes;

use std::process::ExitCode;

const USAGE: &str = "usage: groupnorm <command> [flags]

commands:
  demo    run the worked examples and a realistic shape, forward and backward, on the GPU when
          one is usable and on the CPU always; print parity with the f64 reference and timings
  bench   time forward and backward per shape and dtype, GB/s and % of copy bandwidth, beside
          an unfused baseline (groupnorm bench --help)
  check   randomized parity with the f64 reference over a shape set (groupnorm check --help)
  apply   forward pass on .npy files (groupnorm apply --help)
  grad    backward pass on .npy files (groupnorm grad --help)
  info    print what this binary and machine can do: kernels, driver, device
  help    print this message";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    let wants_help = rest.iter().any(|a| a == "--help" || a == "-h");
    let result = match args.first().map(String::as_str) {
        None => return demo::run(),
        Some("demo") if rest.is_empty() => return demo::run(),
        Some("info") if rest.is_empty() => {
            demo::print_environment();
            return ExitCode::SUCCESS;
        }
        Some("bench") if wants_help => return usage(bench::USAGE),
        Some("check") if wants_help => return usage(check::USAGE),
        Some("apply") if wants_help => return usage(files::APPLY_USAGE),
        Some("grad") if wants_help => return usage(files::GRAD_USAGE),
        Some("bench") => bench::run(rest),
        Some("check") => check::run(rest),
        Some("apply") => files::apply(rest),
        Some("grad") => files::grad(rest),
        Some("help" | "-h" | "--help") => return usage(USAGE),
        Some(other) => Err(files::Failure(
            format!("unknown command or arguments `{other}` (groupnorm help lists the commands)"),
            2,
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(files::Failure(msg, code)) => {
            eprintln!("groupnorm: {msg}");
            ExitCode::from(code)
        }
    }
}

fn usage(text: &str) -> ExitCode {
    println!("{text}");
    ExitCode::SUCCESS
}
