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

use clap::{error::ErrorKind, Parser, Subcommand};
use std::ffi::OsString;
use std::process::ExitCode;

/// GroupNorm on NVIDIA GPUs, with an f64 CPU reference: examples, benchmarks, parity checks and
/// .npy files in and out.
#[derive(Parser)]
#[command(name = "groupnorm", version)]
struct Cli {
    /// What to do (default: demo)
    #[command(subcommand)]
    command: Option<Command>,
}

/// The commands. Those with flags take them raw (`rest`) and parse them with [`args::Args`],
/// whose errors name the flag in one line; `--help` there prints the command's own usage.
#[derive(Subcommand)]
enum Command {
    /// Run the worked examples and a realistic shape, forward and backward, on the GPU when one
    /// is usable and on the CPU always; print parity with the f64 reference and timings
    Demo,
    /// Time forward and backward per shape and dtype, GB/s and % of copy bandwidth, beside an
    /// unfused baseline (groupnorm bench --help)
    Bench(Rest),
    /// Randomized parity with the f64 reference over a shape set (groupnorm check --help)
    Check(Rest),
    /// Forward pass on .npy files (groupnorm apply --help)
    Apply(Rest),
    /// Backward pass on .npy files (groupnorm grad --help)
    Grad(Rest),
    /// Print what this binary and machine can do: kernels, driver, device
    Info,
}

/// A command's flags, unparsed.
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
struct Rest {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<OsString>,
}

impl Rest {
    /// The flags as UTF-8 strings: a non-UTF-8 argument is a usage error (exit 2), not a panic.
    fn strings(&self) -> Result<Vec<String>, files::Failure> {
        self.rest
            .iter()
            .map(|a| {
                a.to_str().map(str::to_string).ok_or_else(|| {
                    files::Failure(
                        format!(
                            "argument `{}` is not valid UTF-8 (flags and file names must be)",
                            a.to_string_lossy()
                        ),
                        2,
                    )
                })
            })
            .collect()
    }

    fn wants_help(&self) -> bool {
        self.rest.iter().any(|a| a == "--help" || a == "-h")
    }
}

/// A command's entry point: its flags in, success or a failure with its exit code out.
type RunFn = fn(&[String]) -> Result<(), files::Failure>;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    let (rest, usage_text, run): (&Rest, &str, RunFn) = match &cli.command {
        None | Some(Command::Demo) => return demo::run(),
        Some(Command::Info) => {
            demo::print_environment();
            return ExitCode::SUCCESS;
        }
        Some(Command::Bench(r)) => (r, bench::USAGE, bench::run),
        Some(Command::Check(r)) => (r, check::USAGE, check::run),
        Some(Command::Apply(r)) => (r, files::APPLY_USAGE, files::apply),
        Some(Command::Grad(r)) => (r, files::GRAD_USAGE, files::grad),
    };
    if rest.wants_help() {
        println!("{usage_text}");
        return ExitCode::SUCCESS;
    }
    match rest.strings().and_then(|args| run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(files::Failure(msg, code)) => {
            eprintln!("groupnorm: {msg}");
            ExitCode::from(code)
        }
    }
}

/// `--help` and `--version` print and succeed; any other command-line error is one line on
/// stderr and exit code 2, like the commands' own flag errors.
fn clap_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // (a closed stdout is not worth a panic)
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::InvalidSubcommand => {
            let given = e
                .get(clap::error::ContextKind::InvalidSubcommand)
                .map(|v| v.to_string())
                .unwrap_or_default();
            eprintln!("groupnorm: unknown command `{given}` (groupnorm help lists the commands)");
            ExitCode::from(2)
        }
        _ => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("bad arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("groupnorm: {first} (groupnorm help lists the commands and their flags)");
            ExitCode::from(2)
        }
    }
}
