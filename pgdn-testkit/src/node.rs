//! One `redis-server` process of a cluster or sentinel setup: started from
//! a config file in its own temporary directory (where it also logs, and
//! where a sentinel rewrites its config), on a free port, with no
//! persistence; killed when dropped, and the directory removed.
//!
//! Two replication settings differ from Redis's defaults, to make a setup
//! ready in about a second rather than ten: a master starts a full sync at
//! once (`repl-diskless-sync-delay 0`, not 5 s), and pings its replicas
//! every second (`repl-ping-replica-period 1`, not 10 s), which moves a
//! fresh replica's offset off 0: until then a cluster leaves it out of
//! `CLUSTER SLOTS`.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{free_port, ping, redis_server_bin};

/// How long a node may take to answer PING after it is spawned.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// A running `redis-server` with its own directory.
#[derive(Debug)]
pub(crate) struct Node {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    paused: AtomicBool,
}

impl Node {
    /// Starts one on a free port: `redis.conf` holds the common lines
    /// (port, loopback, no persistence, dir and log file in the temporary
    /// directory, the replication settings of the module doc) then `extra(port)`; `args` follow the file on the command
    /// line (e.g. `--sentinel`). Waits until it answers PING. A node that
    /// exits first (its port, or another port in `extra`, was taken
    /// meanwhile) is started again with new ports, up to 3 times.
    ///
    /// # Panics
    /// When `redis-server` is not installed, or after 3 failures (with the
    /// last one's log).
    pub(crate) fn start(what: &str, args: &[&str], mut extra: impl FnMut(u16) -> String) -> Node {
        let bin = redis_server_bin();
        let mut last_log = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix(&format!("pgdn-redis-{what}-"))
                .tempdir()
                .expect("a temporary directory");
            let port = free_port();
            let d = dir.path().display();
            let conf = format!(
                "# pgdn-testkit: a {what}.\n\
                 port {port}\n\
                 bind 127.0.0.1\n\
                 protected-mode no\n\
                 daemonize no\n\
                 dir \"{d}\"\n\
                 logfile \"{d}/redis.log\"\n\
                 save \"\"\n\
                 appendonly no\n\
                 repl-diskless-sync-delay 0\n\
                 repl-ping-replica-period 1\n\
                 {}\n",
                extra(port)
            );
            let conf_path = dir.path().join("redis.conf");
            std::fs::write(&conf_path, conf).expect("write redis.conf");
            let child = Command::new(&bin)
                .arg(&conf_path)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            let mut node = Node {
                port,
                dir,
                child: Some(child),
                paused: AtomicBool::new(false),
            };
            if node.wait_ping() {
                return node;
            }
            last_log = node.log();
        }
        panic!("the redis {what} did not start on a free port after 3 tries; its log:\n{last_log}");
    }

    /// Waits until it answers PING; `false` when it exits first or stays
    /// silent too long (then it is killed).
    fn wait_ping(&mut self) -> bool {
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if ping(self.port) {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// Its port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// The last `lines` lines of its log, under a header naming it, for
    /// panic messages.
    pub(crate) fn log_tail(&self, what: &str, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        let state = if self.child.is_none() {
            " (killed)"
        } else if self.is_paused() {
            " (paused)"
        } else {
            ""
        };
        format!(
            "--- {what} 127.0.0.1:{}{state}, last lines of its log ---\n{}\n",
            self.port,
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    /// Whether it runs and is not paused: whether it can answer.
    pub(crate) fn is_live(&self) -> bool {
        self.child.is_some() && !self.is_paused()
    }

    /// Whether it is paused.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Stops the process (`SIGSTOP`).
    pub(crate) fn pause(&self) {
        self.signal("STOP");
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Resumes it (`SIGCONT`).
    pub(crate) fn resume(&self) {
        self.signal("CONT");
        self.paused.store(false, Ordering::SeqCst);
    }

    fn signal(&self, sig: &str) {
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("redis-server on port {} is not running", self.port));
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Kills it (`SIGKILL`, as a crash; a paused process dies too) and
    /// waits for the process to end.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Calls `check` every 50 ms until it gives `Ok` or `timeout` has passed;
/// then `Err` holds its last complaint.
pub(crate) fn poll<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(t) => return Ok(t),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
