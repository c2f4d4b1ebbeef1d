//! The systemd files in `deploy/` match the binary: the unit passes
//! `systemd-analyze verify` (no unknown or misspelt directive) with its
//! `ExecStart` pointed at the built binary; it leaves a graceful shutdown
//! time to finish; every `PGDN_*` setting of the environment file is one
//! the binary reads; and that file, with its secrets filled in, starts the
//! binary (left empty, they stop it with a message naming the setting).
//! (`deploy/nginx/pgdn.conf` is run by tests/nginx.rs.)

mod spawn;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use spawn::{BIN, clean_command};

const UNIT: &str = include_str!("../../deploy/pgdn-server.service");
const ENV_FILE: &str = include_str!("../../deploy/pgdn.env.example");

/// `VAR=value` lines of the environment file; with `commented`, also
/// the commented-out `#VAR=value` examples.
fn settings(commented: bool) -> Vec<(String, String)> {
    ENV_FILE
        .lines()
        .filter_map(|l| {
            let l = match l.strip_prefix('#') {
                Some(rest) if commented => rest,
                Some(_) => return None,
                None => l,
            };
            let (k, v) = l.split_once('=')?;
            k.starts_with("PGDN_")
                .then(|| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn unit_value(key: &str) -> &'static str {
    UNIT.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
}

fn duration(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let dir = std::env::temp_dir().join(format!("pgdn-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pgdn-server.service");
    let unit = UNIT.replace(
        &format!("ExecStart={}", unit_value("ExecStart")),
        &format!("ExecStart={BIN}"),
    );
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs (install it with `apt-get install -y systemd`)");
    let _ = std::fs::remove_dir_all(&dir);
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_unit_waits_longer_than_the_graceful_shutdown() {
    assert_eq!(unit_value("KillSignal"), "SIGTERM");
    let stop = duration(unit_value("TimeoutStopSec"));
    let help = clean_command().arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    // The default, as `--help` states it: `[env: PGDN_SHUTDOWN_TIMEOUT=] [default: 10s]`.
    let line = help
        .split("--shutdown-timeout")
        .nth(1)
        .and_then(|rest| rest.split("[default: ").nth(1))
        .and_then(|rest| rest.split(']').next())
        .expect("--help states the shutdown timeout's default");
    assert!(
        stop > duration(line),
        "TimeoutStopSec {stop:?} <= default {line}"
    );
    let (_, set) = settings(false)
        .into_iter()
        .find(|(k, _)| k == "PGDN_SHUTDOWN_TIMEOUT")
        .expect("the environment file sets the shutdown timeout");
    assert!(stop > duration(&set), "TimeoutStopSec {stop:?} <= {set}");
    let nofile: u64 = unit_value("LimitNOFILE").parse().unwrap();
    assert!(nofile > 100_000, "room for the default --max-connections");
}

#[test]
fn every_setting_of_the_environment_file_is_read_by_the_binary() {
    let help = clean_command().arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let all = settings(true);
    assert!(all.len() >= 10, "{all:?}");
    for (key, _) in all {
        assert!(
            help.contains(&format!("[env: {key}")),
            "{key} is not a setting"
        );
    }
}

#[test]
fn the_environment_file_starts_the_binary_once_its_secrets_are_set() {
    let run = |secrets: bool| {
        let mut cmd = clean_command();
        for (k, v) in settings(false) {
            let v = match k.as_str() {
                // A free port instead of 8000.
                "PGDN_ADDR" => "127.0.0.1:0".to_string(),
                "PGDN_JWT_SECRET" if secrets => "a-jwt-secret-of-at-least-32-bytes-long".into(),
                "PGDN_PUBLISH_KEY" if secrets => "a-publish-key-of-some-length".into(),
                _ => v,
            };
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    };
    // As shipped: the empty secrets stop it, naming the setting.
    let out = run(false).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PGDN_JWT_SECRET") || err.contains("--jwt-secret"),
        "{err}"
    );
    // Filled in: it serves (its first line, an event, names the address).
    let mut child = run(true);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("pgdn-server listening on http://127.0.0.1:"),
        "{line:?}"
    );
}
