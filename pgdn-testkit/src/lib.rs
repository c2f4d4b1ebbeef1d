//! Test tooling of pgdn: a private `redis-server` for tests and benchmarks,
//! on a free port, with no persistence, killed when dropped. Tests never
//! depend on a Redis someone started by hand.
//!
//! A missing `redis-server` is a clear failure, not a skip: the message
//! says how to install it (`cargo xtask test` installs it where it can).
//!
//! For TLS tests, [`TestCa`] makes a private CA and a server certificate at
//! test time, and [`RedisServer::start_tls`] serves Redis over TLS only
//! (`rediss://`) with it.
//!
//! For the topologies a deployment may run, [`RedisCluster`] starts a Redis
//! Cluster and [`RedisSentinel`] a master and replica watched by sentinels,
//! each able to lose its master (killed or paused) and to wait for the
//! failover. Several independent shards are several [`RedisServer`]s
//! ([`RedisServer::start_many`]).
//!
//! # Layout
//! - this file: [`RedisServer`].
//! - `tls`: [`TestCa`].
//! - `deployment`: [`RedisDeployment`], any of pgdn's Redis layouts
//!   (single, shards, cluster, sentinel) started the same way.
//! - `nginx`: [`Nginx`], a private nginx that runs the repository's deploy
//!   file in front of a test server (same rules: a missing `nginx` fails,
//!   naming [`NGINX_INSTALL_HINT`]).
//! - `cluster`: [`RedisCluster`], masters and replicas made into a Redis
//!   Cluster by `redis-cli --cluster create`, with a short node timeout.
//! - `sentinel`: [`RedisSentinel`], one master, one replica and three
//!   sentinels (`redis-server --sentinel`).
//! - `node`: one process of a cluster or sentinel setup (its config file
//!   and log in its own temporary directory), and the polling loop with a
//!   deadline that every wait uses.
//! - `resp`: a minimal RESP2 client over a `TcpStream` for the waits, and
//!   [`redis_cli`], which runs the real `redis-cli` (a missing one fails,
//!   naming [`INSTALL_HINT`]).

mod nginx;

pub use nginx::{NGINX_INSTALL_HINT, Nginx, nginx_path};

mod deployment;

pub use deployment::{REDIS_MODES, RedisDeployment};

mod tls;

pub use tls::TestCa;

mod cluster;

pub use cluster::{CLUSTER_SLOT_COUNT, DEFAULT_NODE_TIMEOUT, RedisCluster};

mod sentinel;

pub use sentinel::{DEFAULT_MASTER_NAME, DOWN_AFTER, RedisSentinel};

mod node;

mod resp;

pub use resp::{redis_cli, redis_cli_path};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The command that installs Redis on Debian.
pub const INSTALL_HINT: &str = "apt-get install -y redis-server";

/// Where `redis-server` is, if installed.
pub fn redis_server_path() -> Option<PathBuf> {
    find_binary("redis-server", "/usr/bin/redis-server")
}

/// `name` on `PATH`, else `fallback` if it is a file.
fn find_binary(name: &str, fallback: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        let p = PathBuf::from(fallback);
        p.is_file().then_some(p)
    })
}

/// `redis-server`, or a panic that says how to install it.
fn redis_server_bin() -> PathBuf {
    redis_server_path().unwrap_or_else(|| {
        panic!(
            "redis-server is not installed; the tests need it. Install it with `{INSTALL_HINT}` \
             (or run `cargo xtask test`, which installs it when it can)"
        )
    })
}

/// A private Redis server.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Certificate, key and CA files when it serves TLS only.
    tls: Option<[PathBuf; 3]>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Sends PING and waits for +PONG.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers PING.
    ///
    /// # Panics
    /// When `redis-server` is not installed (with the command to install
    /// it) or does not come up within 10 s.
    pub fn start() -> RedisServer {
        for _ in 0..3 {
            let mut server = RedisServer {
                port: free_port(),
                child: None,
                tls: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on a free port after 3 tries");
    }

    /// Starts `n` independent servers (e.g. the shards of a deployment
    /// without Redis Cluster), each as [`start`](Self::start).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_many(n: usize) -> Vec<RedisServer> {
        (0..n).map(|_| RedisServer::start()).collect()
    }

    /// Starts one that accepts TLS only (`--port 0 --tls-port <free>`),
    /// with `ca`'s server certificate and no client certificates, and waits
    /// until it logs that it is ready. Its [`url`](Self::url) is
    /// `rediss://127.0.0.1:<port>`; clients must trust [`TestCa::ca_pem`].
    /// Keep `ca` alive as long as the server: a restart reads its files.
    ///
    /// # Panics
    /// As [`start`](Self::start); also when this `redis-server` was built
    /// without TLS.
    pub fn start_tls(ca: &TestCa) -> RedisServer {
        for _ in 0..3 {
            let mut server = RedisServer {
                port: free_port(),
                child: None,
                tls: Some([ca.cert_path(), ca.key_path(), ca.ca_path()]),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server with TLS did not start on a free port after 3 tries");
    }

    fn spawn(&mut self) -> bool {
        let mut command = Command::new(redis_server_bin());
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some([cert, key, ca]) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(if self.tls.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        if self.tls.is_some() {
            return self.wait_ready_line();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.port) {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                // Exited: most likely the port was taken meanwhile.
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// A server that is not started yet, on a port that was free a moment
    /// ago: for a test of a client that must come up before Redis does
    /// ([`RedisServer::start_again`] starts it).
    pub fn not_started() -> RedisServer {
        RedisServer {
            port: free_port(),
            child: None,
            tls: None,
        }
    }

    /// Stops the process (`SIGSTOP`): Redis keeps its connections open but
    /// answers nothing, as a stalled or swapped-out server would, until
    /// [`RedisServer::resume`].
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Resumes a paused server (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the log line saying it accepts connections (a plain PING
    /// cannot reach a TLS-only port); `false` when it exited first (the
    /// port was taken) or stayed silent for 10 s.
    fn wait_ready_line(&mut self) -> bool {
        let Some(stdout) = self.child.as_mut().and_then(|c| c.stdout.take()) else {
            return false;
        };
        let (ready, on_ready) = mpsc::channel();
        // Reads every line, so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    let _ = ready.send(());
                }
            }
        });
        if on_ready.recv_timeout(Duration::from_secs(10)).is_ok() {
            return true;
        }
        self.kill();
        false
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL, e.g. `redis://127.0.0.1:40123` (`rediss://` when started
    /// with [`start_tls`](Self::start_tls)).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills it (like a crash) and waits for the process to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again on the same port, empty (no persistence), and waits
    /// until it answers.
    ///
    /// # Panics
    /// When it does not come back within 10 s.
    pub fn start_again(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_restarts_and_stops() {
        let mut r = RedisServer::start();
        assert!(ping(r.port()));
        r.kill();
        assert!(!ping(r.port()));
        r.start_again();
        assert!(ping(r.port()));
        r.pause();
        assert!(!ping(r.port()), "a paused redis answers nothing");
        r.resume();
        assert!(ping(r.port()));
        let port = r.port();
        drop(r);
        assert!(!ping(port));
    }

    #[test]
    fn starts_many_independent_servers() {
        let shards = RedisServer::start_many(2);
        assert_eq!(shards.len(), 2);
        assert_ne!(shards[0].port(), shards[1].port());
        assert!(shards.iter().all(|s| ping(s.port())));
    }

    #[test]
    fn serves_tls_only_with_the_test_ca() {
        let ca = TestCa::generate();
        assert!(ca.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.key_path().is_file());
        let mut r = RedisServer::start_tls(&ca);
        assert!(r.url().starts_with("rediss://127.0.0.1:"));
        // The port takes connections, but plain RESP gets no PONG.
        assert!(TcpStream::connect(("127.0.0.1", r.port())).is_ok());
        assert!(!ping(r.port()));
        r.start_again();
        assert!(TcpStream::connect(("127.0.0.1", r.port())).is_ok());
        let dir = ca.dir().to_path_buf();
        drop(r);
        drop(ca);
        assert!(!dir.exists());
    }
}
