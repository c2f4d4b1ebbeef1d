//! The `pgdn-server` binary: dev mode with zero configuration, the printed
//! token and curl command really work, SIGTERM shuts down gracefully.

mod common;
mod spawn;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};
use std::time::Duration;

use common::{Client, expect_close};
use spawn::{TempDir, clean_command};

struct Server {
    child: Child,
    /// Every stdout line up to the end of the dev banner.
    lines: Vec<String>,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary in dev mode on a free port; reads stdout up to the
/// banner's closing rule (a blocking read on a pipe: an event, not a sleep).
fn start_dev() -> Server {
    start_dev_with(&[])
}

/// [`start_dev`] with more flags.
fn start_dev_with(args: &[&str]) -> Server {
    let mut child = clean_command()
        .args(["--addr", "127.0.0.1:0"])
        .args(args)
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut lines = Vec::new();
    let mut rules = 0;
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stdout ended early: {lines:#?}"
        );
        let line = line.trim_end().to_string();
        if line.starts_with("=====") {
            rules += 1;
        }
        lines.push(line);
        if rules == 3 {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in reader.lines() {});
    let addr = lines[0]
        .strip_prefix("pgdn-server listening on http://")
        .expect("first line names the address")
        .to_string();
    Server { child, lines, addr }
}

fn after<'a>(lines: &'a [String], label: &str) -> &'a str {
    let i = lines
        .iter()
        .position(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in {lines:#?}"));
    let rest = lines[i].trim_start()[label.len()..].trim();
    if rest.is_empty() {
        lines[i + 1].trim()
    } else {
        rest
    }
}

#[tokio::test]
async fn dev_mode_prints_working_credentials_and_sigterm_closes_with_1001() {
    let server = start_dev();
    let banner = server.lines.join("\n");
    assert!(banner.contains("DEV MODE"), "{banner}");
    let token = after(
        &server.lines,
        "Demo token (user \"demo-user\", group \"demo\", valid 24 h):",
    )
    .to_string();
    let key = after(&server.lines, "Publish key:").to_string();
    assert!(
        banner.contains(&format!("http://{}/?token={token}", server.addr)),
        "demo page URL"
    );

    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", server.addr))
            .await
            .expect("the demo token connects");
    let mut client = Client::after_upgrade(ws).await;
    assert_eq!(client.user_id(), "demo-user");

    // Run the printed curl command exactly as printed.
    let start = banner.find("curl -sS").expect("a curl command");
    let curl: String = banner[start..]
        .lines()
        .take_while(|l| !l.starts_with("====="))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(curl.contains(&key));
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&curl)
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["delivered"], 1, "{reply}");
    let n = client.next().await;
    assert_eq!(n["type"], "info");
    assert_eq!(n["payload"]["title"], "Hello");
    assert_eq!(n["user_id"], "demo-user");

    // SIGTERM: the client gets 1001 and the process exits 0.
    let mut server = server;
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        expect_close(&mut client.ws).await,
        (1001, "server shutting down".to_string())
    );
    let exit = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().unwrap();
        (status, server)
    });
    let (status, _server) = tokio::time::timeout(Duration::from_secs(10), exit)
        .await
        .expect("exits in time")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn half_configured_credentials_are_refused_with_a_clear_message() {
    let out = clean_command()
        .args(["--addr", "127.0.0.1:0", "--jwt-secret", "s3cret"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--publish-key"), "{err}");
}

#[test]
fn help_lists_the_environment_variables() {
    let out = clean_command().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "PGDN_ADDR",
        "PGDN_JWT_SECRET",
        "PGDN_PUBLISH_KEY",
        "PGDN_MAX_FRAME_SIZE",
        "PGDN_RATE_LIMIT",
    ] {
        assert!(help.contains(var), "{var} missing from --help");
    }
}

#[tokio::test]
async fn configured_mode_uses_the_given_credentials_and_is_quiet_about_them() {
    let mut child = clean_command()
        .args(["--addr", "127.0.0.1:0"])
        .env("PGDN_JWT_SECRET", "env-secret-of-at-least-32-bytes!")
        .env("PGDN_PUBLISH_KEY", "env-publish-key-16")
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    let addr = first
        .trim()
        .strip_prefix("pgdn-server listening on http://")
        .unwrap()
        .to_string();
    let token = pgdn_server::JwtAuthenticator::new(b"env-secret-of-at-least-32-bytes!")
        .issue("envuser", &[], Duration::from_secs(60))
        .unwrap();
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .unwrap();
    let mut c = Client::after_upgrade(ws).await;
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/publish"))
        .bearer_auth("env-publish-key-16")
        .body(r#"{"target":{"user":"envuser"},"type":"info"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(c.next().await["user_id"], "envuser");
    let _ = child.kill();
    let _ = child.wait();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    assert!(
        !rest.contains("env-publish-key-16") && !rest.contains("env-secret-of-at-least-32-bytes!"),
        "secrets are not printed"
    );
}

/// Runs the binary to its exit (it must exit by itself within 30 s, as a
/// refused configuration does): whether it succeeded, and its stderr.
fn exit_of(mut cmd: Command) -> (bool, String) {
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the binary started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.success(), err)
}

const GOOD_SECRET: &str = "a-jwt-secret-of-thirty-two-bytes";
const GOOD_KEY: &str = "a-publish-key-16";

#[test]
fn weak_or_empty_secrets_are_refused_naming_the_setting() {
    let dir = TempDir::new("weak");
    let short_file = dir.file("secret", "short-secret-value\n");
    // (flags, environment, what the message must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        // An empty secret would let anyone sign tokens for anyone.
        (
            vec![],
            vec![("PGDN_JWT_SECRET", ""), ("PGDN_PUBLISH_KEY", GOOD_KEY)],
            "PGDN_JWT_SECRET",
        ),
        (
            vec!["--jwt-secret", "short-secret-value"],
            vec![("PGDN_PUBLISH_KEY", GOOD_KEY)],
            "--jwt-secret",
        ),
        (
            vec!["--jwt-secret-file", &short_file],
            vec![("PGDN_PUBLISH_KEY", GOOD_KEY)],
            "PGDN_JWT_SECRET_FILE",
        ),
        (
            vec![],
            vec![("PGDN_JWT_SECRET", GOOD_SECRET), ("PGDN_PUBLISH_KEY", "")],
            "PGDN_PUBLISH_KEY",
        ),
        (
            vec![
                "--jwt-secret",
                GOOD_SECRET,
                "--publish-key",
                "short-key-value",
            ],
            vec![],
            "PGDN_PUBLISH_KEY",
        ),
        // Every key of a rotation set is checked.
        (
            vec![],
            vec![
                ("PGDN_JWT_SECRET", GOOD_SECRET),
                ("PGDN_PUBLISH_KEY", "a-publish-key-16,short-key-value"),
            ],
            "PGDN_PUBLISH_KEY",
        ),
    ];
    for (args, env, named) in cases {
        let mut cmd = clean_command();
        cmd.args(["--addr", "127.0.0.1:0"])
            .args(&args)
            .envs(env.clone());
        let (ok, err) = exit_of(cmd);
        assert!(!ok, "{args:?} {env:?} started");
        assert!(err.contains(named), "{args:?} {env:?}: {err}");
        assert!(
            !err.contains("short-secret-value") && !err.contains("short-key-value"),
            "never echoed: {err}"
        );
    }
}

#[test]
fn help_never_prints_a_secret_from_the_environment() {
    let secrets = [
        ("PGDN_REDIS_URL", "redis://:hunter2-password@10.0.0.5:6379"),
        ("PGDN_JWT_SECRET", "jwt-secret-in-the-environment-0001"),
        ("PGDN_PUBLISH_KEY", "publish-key-in-the-environment"),
    ];
    for args in [&["--help"][..], &["cleanup", "--help"]] {
        let out = clean_command().args(args).envs(secrets).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("PGDN_REDIS_URL"), "{help}");
        for (_, value) in secrets {
            assert!(!help.contains(value), "{args:?} printed a secret:\n{help}");
        }
        assert!(!help.contains("hunter2"), "{help}");
    }
}

#[tokio::test]
async fn secrets_from_files_rotating_keys_origins_and_per_user_limits() {
    let dir = TempDir::new("files");
    let secret_file = dir.file("jwt", &format!("{GOOD_SECRET}\n"));
    let keys_file = dir.file("keys", "the-old-publish-key\nthe-new-publish-key\n");
    // A direct value and its file are exclusive.
    let mut cmd = clean_command();
    cmd.args(["--addr", "127.0.0.1:0", "--jwt-secret", GOOD_SECRET])
        .args(["--jwt-secret-file", &secret_file, "--publish-key", GOOD_KEY]);
    let (ok, err) = exit_of(cmd);
    assert!(!ok && err.contains("cannot be used with"), "{err}");

    let mut child = clean_command()
        .args(["--addr", "127.0.0.1:0", "--max-connections-per-user", "1"])
        .env("PGDN_JWT_SECRET_FILE", &secret_file)
        .env("PGDN_PUBLISH_KEY_FILE", &keys_file)
        .env(
            "PGDN_ALLOWED_ORIGINS",
            "http://app.example,https://other.example",
        )
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    let addr = first
        .trim()
        .strip_prefix("pgdn-server listening on http://")
        .unwrap_or_else(|| panic!("not started: {first:?}"))
        .to_string();
    // Tokens are signed with the file's secret, without its newline.
    let auth = pgdn_server::JwtAuthenticator::new(GOOD_SECRET);
    let token = |user: &str| auth.issue(user, &[], Duration::from_secs(60)).unwrap();
    let ws = |user: &str, origin: Option<&str>| {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{addr}/ws?token={}", token(user))
            .into_client_request()
            .unwrap();
        if let Some(origin) = origin {
            req.headers_mut().insert("origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    let status = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
        Err(e) => panic!("{e}"),
    };
    let (socket, _) = ws("u1", None).await.unwrap();
    let mut c = Client::after_upgrade(socket).await;
    assert_eq!(status(ws("u1", None).await), 429, "one connection per user");
    assert_eq!(status(ws("u2", Some("http://app.example")).await), 101);
    assert_eq!(status(ws("u3", Some("https://other.example")).await), 101);
    assert_eq!(status(ws("u4", Some("http://evil.example")).await), 403);
    let http = reqwest::Client::new();
    for key in ["the-old-publish-key", "the-new-publish-key"] {
        let res = http
            .post(format!("http://{addr}/api/v1/publish"))
            .bearer_auth(key)
            .body(r#"{"target":{"user":"u1"},"type":"info"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{key}");
        assert_eq!(c.next().await["type"], "info");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn dev_mode_allows_any_origin_and_says_so() {
    let server = start_dev();
    let banner = server.lines.join("\n");
    assert!(banner.contains("Any origin may connect"), "{banner}");
    let token = after(
        &server.lines,
        "Demo token (user \"demo-user\", group \"demo\", valid 24 h):",
    );
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/ws?token={token}", server.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", "http://elsewhere.example".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("any origin connects in dev mode");
    Client::after_upgrade(ws).await;
}

/// The history's memory bounds are the binary's to set: with room for one
/// user, a second user's message evicts the first's window, and the first
/// user's resume reports the gap.
#[tokio::test]
async fn history_bounds_are_configurable() {
    let secret = "env-secret-of-at-least-32-bytes!";
    let key = "env-publish-key-16";
    let mut child = clean_command()
        .args(["--addr", "127.0.0.1:0", "--history-max-users", "1"])
        .env("PGDN_JWT_SECRET", secret)
        .env("PGDN_PUBLISH_KEY", key)
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    let addr = first
        .trim()
        .strip_prefix("pgdn-server listening on http://")
        .unwrap()
        .to_string();
    let http = reqwest::Client::new();
    let publish = |user: &str| {
        http.post(format!("http://{addr}/api/v1/publish"))
            .bearer_auth(key)
            .body(format!(r#"{{"target":{{"user":"{user}"}},"type":"info"}}"#))
            .send()
    };
    let reply: serde_json::Value = publish("u1").await.unwrap().json().await.unwrap();
    let since = reply["id"].as_str().unwrap().to_string();
    publish("u1").await.unwrap();
    publish("u2").await.unwrap();
    let token = pgdn_server::JwtAuthenticator::new(secret.as_bytes())
        .issue("u1", &[], Duration::from_secs(60))
        .unwrap();
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}&since={since}"))
            .await
            .unwrap();
    let mut c = Client::after_upgrade(ws).await;
    assert_eq!(
        c.next().await["code"],
        "history_gap",
        "u1's window was evicted"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A configured server whose stderr (its log) is read line by line on a
/// thread, so that a test waits for a line as for any other event.
struct Logged {
    child: Child,
    addr: String,
    rx: std::sync::mpsc::Receiver<String>,
    /// Every stderr line received so far.
    seen: Vec<String>,
}

impl Logged {
    fn start(args: &[&str]) -> Logged {
        let mut child = clean_command()
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .env("PGDN_JWT_SECRET", GOOD_SECRET)
            .env("PGDN_PUBLISH_KEY", GOOD_KEY)
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        std::thread::spawn(move || for _ in stdout.lines() {});
        let addr = first
            .trim()
            .strip_prefix("pgdn-server listening on http://")
            .unwrap_or_else(|| panic!("not started: {first:?}"))
            .to_string();
        Logged {
            child,
            addr,
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line that contains every one of `parts`.
    fn wait_line(&mut self, parts: &[&str]) -> String {
        if let Some(l) = self
            .seen
            .iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return l.clone();
        }
        let deadline = std::time::Instant::now() + common::WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no log line with {parts:?} in:\n{}", self.seen.join("\n"))
            });
            self.seen.push(line.clone());
            if parts.iter().all(|p| line.contains(p)) {
                return line;
            }
        }
    }

    /// Stops the server and returns its whole log.
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader thread ends at end of file, closing the channel.
        self.seen.extend(self.rx.iter());
        self.seen
    }
}

/// A WebSocket request to `addr` with `query` and an optional `Origin`.
async fn ws_status(addr: &str, query: &str, origin: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::{Error, client::IntoClientRequest};
    let mut req = format!("ws://{addr}/ws{query}")
        .into_client_request()
        .unwrap();
    if let Some(origin) = origin {
        req.headers_mut().insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(Error::Http(res)) => res.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn refusals_and_cuts_are_logged_once_with_the_address_and_never_the_token() {
    let mut server = Logged::start(&[
        "--allowed-origins",
        "http://app.example",
        "--max-connections",
        "2",
        "--write-timeout",
        "300ms",
        "--queue-bytes",
        "262144",
    ]);
    let addr = server.addr.clone();
    let auth = pgdn_server::JwtAuthenticator::new(GOOD_SECRET);
    let token = |user: &str| auth.issue(user, &[], Duration::from_secs(60)).unwrap();

    // A forged token: closed with 1008, one line, without the token.
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.Zm9yZ2VkLXNpZ25hdHVyZQ";
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={forged}"))
        .await
        .unwrap();
    assert_eq!(expect_close(&mut ws).await, (1008, "invalid token".into()));
    let line = server.wait_line(&["authentication failed"]);
    assert!(line.contains("remote=127.0.0.1"), "{line}");
    assert!(line.contains("invalid_token"), "{line}");

    // A refused origin.
    let query = format!("?token={}", token("u0"));
    assert_eq!(
        ws_status(&addr, &query, Some("http://evil.example")).await,
        403
    );
    let line = server.wait_line(&["origin_not_allowed"]);
    assert!(
        line.contains("remote=127.0.0.1") && line.contains("403"),
        "{line}"
    );

    // This node's connection limit.
    let (stalled, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={}", token("stalled")))
            .await
            .unwrap();
    let stalled = Client::after_upgrade(stalled).await;
    let (other, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={}", token("other")))
            .await
            .unwrap();
    let _other = Client::after_upgrade(other).await;
    assert_eq!(ws_status(&addr, &query, None).await, 503);
    let line = server.wait_line(&["reason=\"max_connections\""]);
    assert!(
        line.contains("remote=127.0.0.1") && line.contains("WARN"),
        "{line}"
    );

    // A client that does not read: cut off with 1013, logged with its user.
    let http = reqwest::Client::new();
    let pad = "x".repeat(16 * 1024);
    let body =
        format!(r#"{{"target":{{"user":"stalled"}},"type":"info","payload":{{"pad":"{pad}"}}}}"#);
    let mut cut = None;
    // At most 64 MiB: far more than loopback buffers and the queue hold.
    for _ in 0..4096 {
        let res = http
            .post(format!("http://{addr}/api/v1/publish"))
            .bearer_auth(GOOD_KEY)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        while let Ok(line) = server.rx.try_recv() {
            server.seen.push(line.clone());
            if line.contains("slow consumer") {
                cut = Some(line);
            }
        }
        if cut.is_some() {
            break;
        }
        if res.json::<serde_json::Value>().await.unwrap()["delivered"] == 0 {
            // Cut already: the line is on its way.
            cut = Some(server.wait_line(&["slow consumer"]));
            break;
        }
    }
    let line = cut.expect("the stalled client was cut off");
    assert!(line.contains("WARN") && line.contains("stalled"), "{line}");
    assert!(
        line.contains("remote=127.0.0.1") && line.contains("1013"),
        "{line}"
    );
    drop(stalled);

    let log = server.stop();
    let count = |what: &str| log.iter().filter(|l| l.contains(what)).count();
    assert_eq!(count("authentication failed"), 1, "{log:#?}");
    assert_eq!(count("origin_not_allowed"), 1, "{log:#?}");
    assert_eq!(count("slow consumer"), 1, "{log:#?}");
    // Never the token, not even a part of it; no colours down a pipe.
    assert!(
        !log.iter().any(|l| l.contains("Zm9yZ2VkLXNpZ25hdHVyZQ")),
        "{log:#?}"
    );
    assert!(!log.iter().any(|l| l.contains(&token("stalled"))));
    assert!(!log.iter().any(|l| l.contains("\x1b[")), "{log:#?}");
}

#[tokio::test]
async fn json_logs_are_one_object_a_line() {
    let mut server = Logged::start(&["--log-format", "json"]);
    let addr = server.addr.clone();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token=nope"))
        .await
        .unwrap();
    assert_eq!(expect_close(&mut ws).await.0, 1008);
    let line = server.wait_line(&["authentication failed"]);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["remote"], "127.0.0.1", "{v}");
    assert_eq!(v["fields"]["reason"], "invalid_token", "{v}");
    let log = server.stop();
    assert!(log.len() >= 2, "{log:#?}");
    for line in &log {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v.is_object(), "{line}");
    }
}

#[test]
fn an_invalid_log_filter_is_refused_at_start() {
    let mut cmd = clean_command();
    cmd.args(["--addr", "127.0.0.1:0", "--log", "not[a filter"]);
    let (ok, err) = exit_of(cmd);
    assert!(!ok, "{err}");
    assert!(err.contains("--log"), "{err}");
}

/// The nice value of each thread of `pid` named `name` (Linux: the 19th
/// field of `/proc/<pid>/task/<tid>/stat`), and of the others.
#[cfg(target_os = "linux")]
fn nice_values(pid: u32, name: &str) -> (Vec<i32>, Vec<i32>) {
    let (mut named, mut others) = (Vec::new(), Vec::new());
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // The fields after the command name, from the 3rd (the state).
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let nice: i32 = fields[19 - 3].parse().unwrap();
        if comm.trim_end() == name {
            named.push(nice);
        } else {
            others.push(nice);
        }
    }
    (named, others)
}

/// `--session-threads` starts that many `pgdn-session` threads at
/// `--session-nice`, the rest of the server at the usual priority; with
/// `--session-threads 0` there are none and connections still work.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn session_threads_run_at_their_nice_value_and_can_be_turned_off() {
    let server = start_dev_with(&["--session-threads", "3", "--session-nice", "7"]);
    let pid = server.child.id();
    // Each thread lowers its own priority as it starts: wait until all have.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let (sessions, others) = nice_values(pid, "pgdn-session");
        if sessions == [7, 7, 7] {
            assert!(others.iter().all(|n| *n == 0), "{others:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "session threads' nice values: {sessions:?}"
        );
        std::thread::yield_now();
    }
    drop(server);

    let server = start_dev_with(&["--session-threads", "0"]);
    let token = after(
        &server.lines,
        "Demo token (user \"demo-user\", group \"demo\", valid 24 h):",
    )
    .to_string();
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", server.addr))
            .await
            .expect("the demo token connects");
    let mut client = Client::after_upgrade(ws).await;
    client.roundtrip("inline").await;
    let (sessions, _) = nice_values(server.child.id(), "pgdn-session");
    assert!(sessions.is_empty(), "{sessions:?}");
}
