//! Test tooling of pgdn: a private `redis-server` for tests and benchmarks,
//! on a free port, with no persistence, killed when dropped. Tests never
//! depend on a Redis someone started by hand.
//!
//! A missing `redis-server` is a clear failure, not a skip: the message
//! says how to install it (`cargo xtask test` installs it where it can).
//!
//! # Layout
//! - this file: [`RedisServer`].
//! - `nginx`: [`Nginx`], a private nginx that runs the repository's deploy
//!   file in front of a test server (same rules: a missing `nginx` fails,
//!   naming [`NGINX_INSTALL_HINT`]).

mod nginx;

pub use nginx::{NGINX_INSTALL_HINT, Nginx, nginx_path};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The command that installs Redis on Debian.
pub const INSTALL_HINT: &str = "apt-get install -y redis-server";

/// Where `redis-server` is, if installed.
pub fn redis_server_path() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("redis-server"))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        let p = PathBuf::from("/usr/bin/redis-server");
        p.is_file().then_some(p)
    })
}

/// A private Redis server.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
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
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on a free port after 3 tries");
    }

    fn spawn(&mut self) -> bool {
        let bin = redis_server_path().unwrap_or_else(|| {
            panic!(
                "redis-server is not installed; the tests need it. Install it with `{INSTALL_HINT}` \
                 (or run `cargo xtask test`, which installs it when it can)"
            )
        });
        let child = Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
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
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
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

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL, e.g. `redis://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
}
