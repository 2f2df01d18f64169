//! A small `--flag value` parser: the command's flags are few and flat, and its errors must name
//! the flag, so a hand-written parser serves better than a dependency.

use std::collections::BTreeMap;

/// A command-line error: printed as one line, exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<groupnorm::Error> for UsageError {
    fn from(e: groupnorm::Error) -> Self {
        UsageError(e.to_string())
    }
}

/// Parsed flags of one subcommand.
pub struct Args {
    values: BTreeMap<String, String>,
    switches: Vec<String>,
}

impl Args {
    /// Parses `args` against the flags a subcommand accepts: `valued` take a value (`--x FILE` or
    /// `--x=FILE`), `switches` take none.
    pub fn parse(args: &[String], valued: &[&str], switches: &[&str]) -> Result<Args, UsageError> {
        let mut values = BTreeMap::new();
        let mut on = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(UsageError(format!("unexpected argument `{arg}`")));
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            if switches.contains(&name) {
                if inline.is_some() {
                    return Err(UsageError(format!("--{name} takes no value")));
                }
                on.push(name.to_string());
            } else if valued.contains(&name) {
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| UsageError(format!("--{name} needs a value")))?,
                };
                if values.insert(name.to_string(), value).is_some() {
                    return Err(UsageError(format!("--{name} given twice")));
                }
            } else {
                let known: Vec<String> = valued
                    .iter()
                    .chain(switches)
                    .map(|f| format!("--{f}"))
                    .collect();
                return Err(UsageError(format!(
                    "unknown flag --{name} (this command takes {})",
                    known.join(", ")
                )));
            }
        }
        Ok(Args {
            values,
            switches: on,
        })
    }

    /// The value of `--name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The value of `--name`, which must be given.
    pub fn required(&self, name: &str) -> Result<&str, UsageError> {
        self.get(name)
            .ok_or_else(|| UsageError(format!("--{name} is required")))
    }

    /// Whether the switch `--name` was given.
    pub fn on(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    /// `--name` parsed as `T`, or `default` when absent.
    pub fn parsed<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, UsageError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| UsageError(format!("--{name}: `{v}` is not a valid value"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn values_switches_and_errors() {
        let a = Args::parse(
            &s(&["--x", "a.npy", "--eps=1e-6", "--silu"]),
            &["x", "eps"],
            &["silu"],
        )
        .unwrap();
        assert_eq!(a.get("x"), Some("a.npy"));
        assert_eq!(a.parsed("eps", 1e-5).unwrap(), 1e-6);
        assert!(a.on("silu"));
        assert!(Args::parse(&s(&["--y", "1"]), &["x"], &[]).is_err());
        assert!(Args::parse(&s(&["--x"]), &["x"], &[]).is_err());
        assert!(Args::parse(&s(&["--x", "1", "--x", "2"]), &["x"], &[]).is_err());
        assert!(Args::parse(&s(&["stray"]), &["x"], &[]).is_err());
        let a = Args::parse(&s(&["--eps", "abc"]), &["eps"], &[]).unwrap();
        assert!(a.parsed("eps", 1e-5f64).is_err());
    }
}
