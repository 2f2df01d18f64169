//! The `groupnorm` command.
//!
//! ```text
//! groupnorm demo     worked examples and a Stable Diffusion shape, GPU when present, CPU otherwise
//! groupnorm info     what this binary and machine can do (kernels, driver, device)
//! ```

mod demo;

use std::process::ExitCode;

const USAGE: &str = "usage: groupnorm <command>

commands:
  demo    run the worked examples and a realistic shape, forward and backward, on the GPU when
          one is usable and on the CPU always; print parity with the f64 reference and timings
  info    print what this binary and machine can do: kernels, driver, device
  help    print this message";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("demo") if args.len() <= 1 => demo::run(),
        Some("info") if args.len() == 1 => {
            demo::print_environment();
            ExitCode::SUCCESS
        }
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("groupnorm: unknown arguments {args:?}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
