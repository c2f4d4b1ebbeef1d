//! `cargo xtask <task>`: the project's own tooling.
//!
//! - `cargo xtask test`: everything CI checks: formatting, clippy with
//!   warnings denied, and every test of the workspace. It first makes sure
//!   what the tests need is installed (`redis-server`, `chromium`,
//!   `nginx`, `python3` with `requests`, `systemd-analyze`, OpenSSL's
//!   headers), installing it with apt-get when it can. Last it builds the
//!   feature sets the workspace build does not cover (pgdn-client without
//!   TLS and with native-tls only, pgdn-server embedded without default
//!   features) and runs their tests.
//! - `cargo xtask bench`: see `bench.rs` (also `--publisher`, the
//!   blocking publisher, and `--cluster`, nodes on one Redis and on
//!   several).

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

/// Whether an executable `name` is in `/usr/bin`, `/usr/sbin` (nginx's
/// place on Debian, off a normal user's PATH) or on PATH; for an absolute
/// path (a header file), whether that file exists.
fn has_program(name: &str) -> bool {
    if name.starts_with('/') {
        return std::path::Path::new(name).is_file();
    }
    ["/usr/bin", "/usr/sbin"]
        .iter()
        .any(|dir| std::path::Path::new(dir).join(name).is_file())
        || env::var_os("PATH")
            .is_some_and(|p| env::split_paths(&p).any(|dir| dir.join(name).is_file()))
}

/// Whether `python3` can import the `requests` module (the README's
/// Python publisher uses it).
fn has_python_requests() -> bool {
    Command::new("python3")
        .args(["-c", "import requests"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes sure `program` is installed: when it is missing and we can
/// install it (root, with apt-get: Debian's package `package`), we do;
/// otherwise we stop with the command to run. `why` names the tests.
fn ensure_installed(program: &str, package: &str, why: &str) -> bool {
    ensure(program, &|| has_program(program), package, why)
}

/// Like [`ensure_installed`], for what `present` checks (a program, a
/// Python module), called `what` in messages.
fn ensure(what: &str, present: &dyn Fn() -> bool, package: &str, why: &str) -> bool {
    if present() {
        return true;
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let has_apt = Command::new("apt-get")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(is_root && has_apt) {
        eprintln!(
            "xtask: {what} is missing ({why} need it); install it with:\n    sudo apt-get install -y {package}"
        );
        return false;
    }
    eprintln!("xtask: {what} is missing ({why} need it); installing {package}");
    // Non-interactive: no debconf prompt may wait for an answer.
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    if run(apt(&["update"])) && run(apt(&["install", "-y", package])) && present() {
        return true;
    }
    eprintln!(
        "xtask: could not install {package}; install it with:\n    apt-get update && apt-get install -y {package}"
    );
    false
}

fn test() -> ExitCode {
    // What the tests need and what installs it: rustfmt and clippy;
    // redis-server for the cluster tests (pgdn-testkit starts a private one
    // on a free port; nothing is expected to be running); Chromium for the
    // browser test (pgdn-server/tests/browser.rs); nginx for the test of
    // the shipped nginx file (pgdn-server/tests/nginx.rs: pgdn-testkit runs
    // its own nginx process with that file on free ports; the package's
    // default site and service are not used); python3 with requests for the
    // README's Python publisher (pgdn-server/tests/readme.rs);
    // systemd-analyze to verify the shipped unit (pgdn-server/tests/deploy.rs).
    for (sub, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if !has_cargo_subcommand(sub) {
            eprintln!(
                "xtask: `cargo {sub}` is missing; install it with:\n    rustup component add {component}"
            );
            return ExitCode::FAILURE;
        }
    }
    let services = [
        ("redis-server", "redis-server", "the cluster tests"),
        ("chromium", "chromium", "the browser tests"),
        ("nginx", "nginx", "the nginx tests"),
        ("systemd-analyze", "systemd", "the deploy tests"),
        ("python3", "python3", "the README tests"),
        ("pkg-config", "pkg-config", "pgdn-client's native-tls tests"),
        (
            "/usr/include/openssl/ssl.h",
            "libssl-dev",
            "pgdn-client's native-tls tests",
        ),
    ];
    for (program, package, why) in services {
        if !ensure_installed(program, package, why) {
            return ExitCode::FAILURE;
        }
    }
    let requests = "python3's requests module";
    if !ensure(
        requests,
        &has_python_requests,
        "python3-requests",
        "the README tests",
    ) {
        return ExitCode::FAILURE;
    }
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    let mut tests = cargo();
    tests.args(["test", "--workspace", "--all-targets"]);
    let mut doctests = cargo();
    doctests.args(["test", "--workspace", "--doc"]);
    // Feature sets the workspace build does not cover: pgdn-client without
    // TLS (an https URL is refused when built) and with native-tls only,
    // and pgdn-server as an app embeds it (no binary, no TLS, no Redis).
    let mut client_without_tls = cargo();
    client_without_tls.args([
        "test",
        "-p",
        "pgdn-client",
        "--no-default-features",
        "--features",
        "publisher",
        "--lib",
    ]);
    let mut client_native_tls = cargo();
    client_native_tls.args([
        "test",
        "-p",
        "pgdn-client",
        "--no-default-features",
        "--features",
        "publisher,blocking,subscriber,native-tls",
        "--test",
        "tls",
    ]);
    let mut server_embedded = cargo();
    server_embedded.args(["check", "-p", "pgdn-server", "--no-default-features"]);
    let feature_sets = [client_without_tls, client_native_tls, server_embedded];
    for cmd in [fmt, clippy, tests, doctests]
        .into_iter()
        .chain(feature_sets)
    {
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
            eprintln!(
                "usage: cargo xtask <test|bench> [options]\n  test   formatting, clippy and every test (what CI runs)\n  bench  throughput, latency and memory against a bare tokio-tungstenite baseline\n         (--publisher: the blocking publisher; --cluster: nodes on Redis; --help)"
            );
            ExitCode::FAILURE
        }
    }
}
