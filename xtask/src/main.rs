//! `cargo xtask <task>`: the project's own tooling.
//!
//! - `cargo xtask test`: everything CI checks: formatting, clippy with
//!   warnings denied, and every test of the workspace. It first makes sure
//!   the services the tests need are installed (none yet for the
//!   single-node server).
//! - `cargo xtask bench`: see `bench.rs`.

use std::env;
use std::process::{Command, ExitCode};

mod bench;

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Runs `cmd`, printing it first; false when it fails.
fn run(mut cmd: Command) -> bool {
    eprintln!("xtask: running {cmd:?}");
    match cmd.status() {
        Ok(s) => s.success(),
        Err(e) => {
            eprintln!("xtask: could not start {cmd:?}: {e}");
            false
        }
    }
}

/// Whether `cargo <sub> --version` works, i.e. the component is installed.
fn has_cargo_subcommand(sub: &str) -> bool {
    let mut cmd = cargo();
    cmd.args([sub, "--version"]);
    cmd.stdout(std::process::Stdio::null());
    cmd.stderr(std::process::Stdio::null());
    cmd.status().is_ok_and(|s| s.success())
}

fn test() -> ExitCode {
    // What the tests need and what installs it. The single-node server
    // needs nothing beyond the toolchain; Redis and Chromium join this list
    // with the issues that test against them.
    for (sub, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if !has_cargo_subcommand(sub) {
            eprintln!(
                "xtask: `cargo {sub}` is missing; install it with:\n    rustup component add {component}"
            );
            return ExitCode::FAILURE;
        }
    }
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    let mut tests = cargo();
    tests.args(["test", "--workspace", "--all-targets"]);
    let mut doctests = cargo();
    doctests.args(["test", "--workspace", "--doc"]);
    for cmd in [fmt, clippy, tests, doctests] {
        if !run(cmd) {
            return ExitCode::FAILURE;
        }
    }
    eprintln!("xtask: all checks passed");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench") => bench::main(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <test|bench> [options]\n  test   formatting, clippy and every test (what CI runs)\n  bench  throughput, latency and memory against a bare tokio-tungstenite baseline");
            ExitCode::FAILURE
        }
    }
}
