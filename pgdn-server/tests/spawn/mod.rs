//! The real `pgdn-server` binary in tests: a command with a clean
//! environment, a started process (killed when dropped) and a private
//! temporary directory. Shared by every test file that runs the binary
//! (`mod spawn;`), so that each does not carry its own copy.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pgdn-server");

/// The binary with none of the caller's `PGDN_*` variables (a developer's
/// own settings must not change what a test sees), stdin closed, stdout and
/// stderr piped.
pub fn clean_command() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PGDN_")) {
        cmd.env_remove(k);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A started binary, killed when dropped.
pub struct Running {
    pub child: Child,
    /// The `listening on` URL, e.g. `http://127.0.0.1:40123` (`https` with
    /// TLS).
    pub url: String,
}

impl Running {
    /// Starts `cmd` (made by [`clean_command`]) and reads its stdout up to
    /// the `pgdn-server listening on` line: a blocking read on a pipe, an
    /// event, not a sleep. Both pipes are drained afterwards, so the child
    /// never blocks on a full one. Panics with its stderr when it ends
    /// without listening.
    pub fn start(mut cmd: Command) -> Running {
        let mut child = cmd.spawn().expect("pgdn-server starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = lines.by_ref().map_while(Result::ok).find_map(|l| {
            l.strip_prefix("pgdn-server listening on ")
                .map(String::from)
        });
        let Some(url) = url else {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("no `listening on` line; stderr: {err}");
        };
        std::thread::spawn(move || for _ in lines {});
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
        }
        Running { child, url }
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        self.url.split_once("://").map_or(&self.url, |(_, a)| a)
    }

    /// Its WebSocket URL: `ws://` or, with TLS, `wss://` on `/ws`.
    pub fn ws(&self) -> String {
        let scheme = if self.url.starts_with("https") {
            "wss"
        } else {
            "ws"
        };
        format!("{scheme}://{}/ws", self.addr())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of its own under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("pgdn-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `contents` to `name` in it; returns the path.
    pub fn file(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
