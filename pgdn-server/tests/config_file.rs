//! The `pgdn-server` binary's configuration file (`--config`, `PGDN_CONFIG`)
//! and `--print-config`: a file's settings are used by the real server,
//! the environment overrides the file and a flag the environment, a wrong
//! key is refused by name, and the printed configuration hides secrets and
//! reads back as a configuration file.

mod common;
mod spawn;

use std::process::Command;
use std::time::Duration;

use common::Client;
use spawn::{Running, TempDir, clean_command};

const SECRET: &str = "file-jwt-secret-of-32-bytes-long";
const FILE_KEY: &str = "the-files-publish-key";

/// Runs the binary to its exit (within 30 s): success, stdout, stderr.
fn run(mut cmd: Command) -> (bool, String, String) {
    let child = cmd.spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the binary exits by itself")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The HTTP status of a publish to `user` with `key`.
async fn publish(addr: &str, key: &str, user: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/publish"))
        .bearer_auth(key)
        .body(format!(r#"{{"target":{{"user":"{user}"}},"type":"info"}}"#))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn token(user: &str) -> String {
    pgdn_server::JwtAuthenticator::new(SECRET.as_bytes())
        .issue(user, &[], Duration::from_secs(60))
        .unwrap()
}

#[tokio::test]
async fn the_server_uses_the_files_address_paths_and_keys() {
    let dir = TempDir::new("uses");
    // The secret from a file named in the config file.
    let secret_file = dir.file("jwt", &format!("{SECRET}\n"));
    let config = dir.file(
        "pgdn.toml",
        &format!(
            r#"
addr = "127.0.0.1:0"
ws-path = "/live"
jwt-secret-file = "{secret_file}"
publish-key = ["{FILE_KEY}"]
max-connections-per-user = 1
ping-interval = "30s"
demo-page = false
"#
        ),
    );
    let mut cmd = clean_command();
    cmd.args(["--config", &config]);
    let server = Running::start(cmd);
    let addr = server.addr();
    // Configured mode: the file's credentials, no dev banner.
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/live?token={}", token("u1")))
            .await
            .expect("the file's ws-path and secret");
    let mut c = Client::after_upgrade(ws).await;
    assert_eq!(c.user_id(), "u1");
    let refused = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
        Ok(_) => 101,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        refused(
            tokio_tungstenite::connect_async(format!("ws://{addr}/live?token={}", token("u1")))
                .await
        ),
        429,
        "max-connections-per-user = 1"
    );
    assert_eq!(
        refused(
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={}", token("u2"))).await
        ),
        404,
        "the default path is not served"
    );
    assert_eq!(publish(addr, FILE_KEY, "u1").await, 200);
    assert_eq!(c.next().await["type"], "info");
    assert_eq!(publish(addr, "not-the-publish-key", "u1").await, 401);
    let demo = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(demo.status(), 404, "demo-page = false");
}

#[tokio::test]
async fn the_environment_overrides_the_file_and_a_flag_the_environment() {
    let dir = TempDir::new("precedence");
    let config = dir.file(
        "pgdn.toml",
        &format!(
            "addr = \"127.0.0.1:0\"\njwt-secret = \"{SECRET}\"\npublish-key = \"{FILE_KEY}\"\n"
        ),
    );
    const ENV_KEY: &str = "the-environments-key";
    const FLAG_KEY: &str = "the-command-lines-key";

    // The file by PGDN_CONFIG, its key overridden by PGDN_PUBLISH_KEY.
    let mut cmd = clean_command();
    cmd.env("PGDN_CONFIG", &config)
        .env("PGDN_PUBLISH_KEY", ENV_KEY);
    let server = Running::start(cmd);
    assert_eq!(publish(server.addr(), ENV_KEY, "u").await, 200);
    assert_eq!(publish(server.addr(), FILE_KEY, "u").await, 401);
    drop(server);

    // ... and the variable by the flag.
    let mut cmd = clean_command();
    cmd.args(["--config", &config, "--publish-key", FLAG_KEY])
        .env("PGDN_PUBLISH_KEY", ENV_KEY);
    let server = Running::start(cmd);
    assert_eq!(publish(server.addr(), FLAG_KEY, "u").await, 200);
    assert_eq!(publish(server.addr(), ENV_KEY, "u").await, 401);
    assert_eq!(publish(server.addr(), FILE_KEY, "u").await, 401);
    drop(server);

    // A variable also overrides a file's value it conflicts with: the
    // secret's file from the environment beats the file's inline secret.
    let other = "another-jwt-secret-of-32-bytes!!";
    let secret_file = dir.file("jwt", other);
    let mut cmd = clean_command();
    cmd.args(["--config", &config])
        .env("PGDN_JWT_SECRET_FILE", &secret_file);
    let server = Running::start(cmd);
    let signed = pgdn_server::JwtAuthenticator::new(other.as_bytes())
        .issue("v", &[], Duration::from_secs(60))
        .unwrap();
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={signed}", server.addr()))
            .await
            .expect("the environment's secret file");
    Client::after_upgrade(ws).await;

    // Numbers the same way, as --print-config shows.
    let max = |env: Option<&str>, flag: Option<&str>| {
        let mut cmd = clean_command();
        cmd.arg("--print-config");
        let file = dir.file("limits.toml", "max-connections = 10\n");
        cmd.args(["--config", &file]);
        if let Some(env) = env {
            cmd.env("PGDN_MAX_CONNECTIONS", env);
        }
        if let Some(flag) = flag {
            cmd.args(["--max-connections", flag]);
        }
        let (ok, out, err) = run(cmd);
        assert!(ok, "{err}");
        let table: toml::Table = out.parse().unwrap();
        table["max-connections"].as_integer().unwrap()
    };
    assert_eq!(max(None, None), 10);
    assert_eq!(max(Some("20"), None), 20);
    assert_eq!(max(Some("20"), Some("30")), 30);
}

#[test]
fn unknown_keys_and_wrong_types_are_refused_by_name() {
    let dir = TempDir::new("refused");
    // (file, what stderr must name)
    let cases = [
        ("max-conections = 10\n", "`max-conections`"),
        ("max-conections = 10\n", "did you mean `max-connections`"),
        ("[server]\naddr = \"127.0.0.1:0\"\n", "`server`"),
        ("max-connections = \"many\"\n", "`max-connections`"),
        ("max-connections = true\n", "`max-connections`"),
        ("ping-interval = 30\n", "`ping-interval`"),
        ("ws-path = [\"/a\", \"/b\"]\n", "`ws-path`"),
        ("demo-page = \"maybe\"\n", "`demo-page`"),
        ("jwt-secret = 1234567890123\n", "`jwt-secret`"),
        ("addr = \"nowhere\"\n", "`addr`"),
        (
            "jwt-secret = \"secret-in-the-config-file-000000\"\njwt-secret-file = \"/x\"\n",
            "`jwt-secret` and `jwt-secret-file`",
        ),
        // A syntax error names the line, not its text (a secret's).
        ("\n\njwt-secret = \"secret-in-the-config-file\n", "line 3"),
    ];
    for (i, (file, named)) in cases.into_iter().enumerate() {
        let path = dir.file(&format!("{i}.toml"), file);
        let mut cmd = clean_command();
        cmd.args(["--addr", "127.0.0.1:0", "--config", &path]);
        let (ok, _, err) = run(cmd);
        assert!(!ok, "{file:?} was accepted");
        assert!(err.contains(named), "{file:?}: {err}");
        assert!(err.contains(&path), "the file is named: {err}");
        assert!(
            !err.contains("secret-in-the-config-file") && !err.contains("1234567890123"),
            "a secret is never echoed: {err}"
        );
    }
    let mut cmd = clean_command();
    cmd.args(["--config", &dir.0.join("missing.toml").to_string_lossy()]);
    let (ok, _, err) = run(cmd);
    assert!(!ok && err.contains("missing.toml"), "{err}");
}

#[test]
fn print_config_masks_secrets_and_reads_back_as_a_config_file() {
    let dir = TempDir::new("print");
    let redis = "redis://:redis-password-here@127.0.0.1:6390/0";
    let keys = ["the-first-publish-key", "the-second-publish-key"];
    let config = dir.file(
        "pgdn.toml",
        &format!(
            r#"
addr = "127.0.0.1:0"
jwt-secret = "{SECRET}"
publish-key = ["{}", "{}"]
redis-url = "{redis}"
ws-path = "/from-the-file"
max-connections = 4321
rate-limit = 2.5
idle-timeout = "2m"
trusted-proxies = ["10.0.0.0/8", "192.168.1.1"]
demo-page = false
"#,
            keys[0], keys[1]
        ),
    );
    let print = |config: &str| {
        let mut cmd = clean_command();
        cmd.args(["--config", config, "--print-config"]);
        let (ok, out, err) = run(cmd);
        assert!(ok, "{err}");
        out
    };
    let printed = print(&config);
    for secret in [SECRET, keys[0], keys[1], "redis-password-here"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    let mut table: toml::Table = printed.parse().expect("the output is TOML");
    // The file's values, typed as in the file.
    assert_eq!(table["ws-path"].as_str(), Some("/from-the-file"));
    assert_eq!(table["max-connections"].as_integer(), Some(4321));
    assert_eq!(table["rate-limit"].as_float(), Some(2.5));
    assert_eq!(table["idle-timeout"].as_str(), Some("2m"));
    assert_eq!(table["demo-page"].as_bool(), Some(false));
    assert_eq!(
        table["trusted-proxies"].as_array().unwrap().len(),
        2,
        "{printed}"
    );
    // Defaults are shown too; unset optional flags are commented out.
    assert_eq!(table["sse-path"].as_str(), Some("/sse"));
    assert!(printed.contains("\n# node-id ="), "{printed}");
    // Masked: the secrets' places are kept, the redis URL's host shown.
    assert_eq!(table["jwt-secret"].as_str(), Some("***"));
    assert_eq!(
        table["publish-key"].as_array().unwrap(),
        &vec![toml::Value::from("***"); 2]
    );
    assert_eq!(
        table["redis-url"].as_str(),
        Some("redis://***@127.0.0.1:6390/0")
    );

    // With the secrets put back, the output is a configuration file that
    // yields the same configuration.
    table.insert("jwt-secret".into(), SECRET.into());
    table.insert("publish-key".into(), keys.to_vec().into());
    table.insert("redis-url".into(), redis.into());
    let again = dir.file("again.toml", &toml::to_string(&table).unwrap());
    assert_eq!(print(&again), printed);
    // The printed text itself, unchanged, is accepted too.
    let verbatim = dir.file("verbatim.toml", &printed);
    assert_eq!(print(&verbatim), printed);
}
