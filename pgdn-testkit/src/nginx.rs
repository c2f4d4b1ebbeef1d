//! A private nginx for tests: runs a site file as shipped (the repository's
//! `deploy/nginx/pgdn.conf`) in front of a test server, as an ordinary
//! process (`nginx -p <dir> -c <file> -g 'daemon off;'`) on free ports,
//! with a certificate made at start and every path in a temporary
//! directory. The system's nginx configuration and service are never
//! touched, and nothing binds port 80 or 443.
//!
//! The site file is rewritten line by line (one directive per line, as the
//! deploy file is written), and only where a test must differ:
//!
//! - each `listen` gets `127.0.0.1:<free port>`, keeping its flags (`ssl`);
//! - the `server` lines of each `upstream` block become one, the test
//!   server's address;
//! - `ssl_certificate` and `ssl_certificate_key` name a certificate for
//!   `localhost` and `127.0.0.1` signed by a CA made for this instance
//!   ([`Nginx::ca_pem`]);
//! - `access_log` and `error_log` write into the temporary directory
//!   (format and level kept).
//!
//! Everything else (locations, headers, timeouts, buffering) runs as
//! written. A site without a `listen ... ssl`, a certificate or an upstream
//! is refused with a panic, so a test cannot silently run something else.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{TestCa, free_port};

/// The command that installs nginx on Debian.
pub const NGINX_INSTALL_HINT: &str = "apt-get install -y nginx";

/// How long nginx may take to start or stop.
const DEADLINE: Duration = Duration::from_secs(10);

/// Where `nginx` is, if installed: on `PATH`, else `/usr/sbin/nginx`
/// (Debian's place, not on a normal user's `PATH`).
pub fn nginx_path() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nginx"))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        let p = PathBuf::from("/usr/sbin/nginx");
        p.is_file().then_some(p)
    })
}

/// A running nginx, stopped (SIGTERM to its master, which stops its
/// workers) and its directory removed when dropped.
#[derive(Debug)]
pub struct Nginx {
    /// Holds the configuration, certificates, logs, pid and temp files.
    dir: tempfile::TempDir,
    /// The master process.
    child: Option<Child>,
    /// The ports of the site's `listen` directives, in order, and whether
    /// each is `ssl`.
    listens: Vec<(u16, bool)>,
    /// The test CA's certificate, PEM.
    ca_pem: String,
    /// The site file as run.
    site: String,
}

/// The directive a config line holds (its first word) and the rest,
/// without the `;`. `None` for blank lines, comments and braces alone.
fn directive(line: &str) -> Option<(&str, &str)> {
    let code = line.split('#').next().unwrap_or("").trim();
    if code.is_empty() || code == "}" {
        return None;
    }
    let (name, rest) = code.split_once(char::is_whitespace).unwrap_or((code, ""));
    Some((name, rest.trim().trim_end_matches(';').trim()))
}

/// What [`rewrite_site`] changed, for the checks and the accessors.
#[derive(Debug, Default)]
struct Rewritten {
    text: String,
    listens: Vec<(u16, bool)>,
    upstreams: usize,
    certificates: usize,
}

/// Rewrites `site` as the module doc says; `port` gives each `listen` its
/// port, `dir` holds certificates and logs.
fn rewrite_site(
    site: &str,
    upstream: SocketAddr,
    dir: &Path,
    mut port: impl FnMut() -> u16,
) -> Rewritten {
    let mut out = Rewritten::default();
    let mut in_upstream = false;
    let mut upstream_written = false;
    for line in site.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        let replaced = match directive(line) {
            Some(("upstream", _)) => {
                in_upstream = true;
                upstream_written = false;
                out.upstreams += 1;
                None
            }
            Some(("server", _)) if in_upstream && upstream_written => Some(String::new()),
            Some(("server", _)) if in_upstream => {
                upstream_written = true;
                Some(format!("{indent}server {upstream};"))
            }
            Some(("listen", args)) => {
                let flags: Vec<&str> = args.split_whitespace().skip(1).collect();
                let ssl = flags.contains(&"ssl");
                let p = port();
                out.listens.push((p, ssl));
                Some(format!("{indent}listen 127.0.0.1:{p} {};", flags.join(" ")))
            }
            Some(("ssl_certificate", _)) => {
                out.certificates += 1;
                Some(format!(
                    "{indent}ssl_certificate {};",
                    dir.join("cert.pem").display()
                ))
            }
            Some(("ssl_certificate_key", _)) => Some(format!(
                "{indent}ssl_certificate_key {};",
                dir.join("key.pem").display()
            )),
            Some((log @ ("access_log" | "error_log"), args)) => {
                let kept: Vec<&str> = args.split_whitespace().skip(1).collect();
                let file = dir.join(if log == "access_log" {
                    "access.log"
                } else {
                    "error.log"
                });
                Some(format!(
                    "{indent}{log} {} {};",
                    file.display(),
                    kept.join(" ")
                ))
            }
            _ => None,
        };
        if line.trim() == "}" {
            in_upstream = false;
        }
        out.text.push_str(replaced.as_deref().unwrap_or(line));
        out.text.push('\n');
    }
    out
}

impl Nginx {
    /// Starts nginx with `site` (an http-level configuration file's text,
    /// such as `deploy/nginx/pgdn.conf`) rewritten to proxy to
    /// `upstream`, and waits until each of its ports accepts connections.
    ///
    /// # Panics
    /// When `nginx` is not installed (with the command to install it),
    /// when `site` has no `listen ... ssl`, certificate or upstream, or
    /// when nginx does not come up within 10 s (with its error log).
    pub fn start(site: &str, upstream: SocketAddr) -> Nginx {
        let bin = nginx_path().unwrap_or_else(|| {
            panic!(
                "nginx is not installed; the nginx tests need it. Install it with \
                 `{NGINX_INSTALL_HINT}` (or run `cargo xtask test`, which installs it when it can)"
            )
        });
        let mut last_error = String::new();
        // A free port may be taken between choosing and binding it: retry.
        for _ in 0..3 {
            let mut nginx = Nginx::prepare(site, upstream);
            match nginx.spawn(&bin) {
                Ok(()) => return nginx,
                Err(log) => last_error = log,
            }
        }
        panic!("nginx did not start after 3 tries; its error log:\n{last_error}");
    }

    /// Writes the certificates and configuration into a new directory.
    fn prepare(site: &str, upstream: SocketAddr) -> Nginx {
        let dir = tempfile::Builder::new()
            .prefix("pgdn-nginx-")
            .tempdir()
            .expect("a temporary directory");
        let path = dir.path();
        let ca = TestCa::generate();
        std::fs::write(path.join("cert.pem"), &ca.cert_pem).expect("write the certificate");
        std::fs::write(path.join("key.pem"), &ca.key_pem).expect("write the key");
        let rewritten = rewrite_site(site, upstream, path, free_port);
        assert!(
            rewritten.listens.iter().any(|&(_, ssl)| ssl),
            "the site has no `listen ... ssl`:\n{site}"
        );
        assert_eq!(
            rewritten.certificates, 1,
            "the site needs one ssl_certificate"
        );
        assert!(rewritten.upstreams > 0, "the site has no upstream block");
        std::fs::write(path.join("site.conf"), &rewritten.text).expect("write the site");
        // When the tests run as root, the master stays root and the
        // workers switch to nginx's default user (nobody), who must be
        // able to enter this directory for the temp paths nginx makes in it.
        if is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                .expect("make the directory traversable");
        }
        let d = path.display();
        let main = format!(
            "# pgdn-testkit: the main configuration around the site under test.\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             worker_processes 1;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   include {d}/site.conf;\n\
             }}\n"
        );
        std::fs::write(path.join("nginx.conf"), main).expect("write nginx.conf");
        Nginx {
            dir,
            child: None,
            listens: rewritten.listens,
            ca_pem: ca.ca_pem.clone(),
            site: rewritten.text,
        }
    }

    /// Starts the process and waits for its ports; `Err(error log)` when it
    /// exits or does not answer in time.
    fn spawn(&mut self, bin: &Path) -> Result<(), String> {
        let dir = self.dir.path();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            // The log for what happens before the configuration is read
            // (else the compiled-in /var/log/nginx/error.log).
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            let up = self.listens.iter().all(|&(port, _)| {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            if up {
                return Ok(());
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(self.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(format!(
            "no answer within {DEADLINE:?}\n{}",
            self.error_log()
        ))
    }

    /// The port of the site's first `listen ... ssl`.
    pub fn https_port(&self) -> u16 {
        self.listens
            .iter()
            .find(|&&(_, ssl)| ssl)
            .map(|&(port, _)| port)
            .expect("checked at start")
    }

    /// `https://localhost:<port>`: the origin a browser would use.
    pub fn https_origin(&self) -> String {
        format!("https://localhost:{}", self.https_port())
    }

    /// The certificate of the CA that signed nginx's, PEM: what a client
    /// trusts to connect.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The site file as nginx runs it (after the rewrite).
    pub fn site(&self) -> &str {
        &self.site
    }

    /// The access log written so far (the site's `access_log`).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// The error log written so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Stops nginx: SIGTERM to the master (it stops its workers), then
    /// SIGKILL if it is still there after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether this process runs as root (the owner of `/proc/self`).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_ports_upstream_certificates_and_logs() {
        let site = "\
log_format f '$uri';
upstream app {
    server 10.0.0.1:8000;
    server 10.0.0.2:8000;
    keepalive 4;
}
server {
    listen 443 ssl; # TLS
    ssl_certificate /etc/ssl/a.pem;
    ssl_certificate_key /etc/ssl/a.key;
    access_log /var/log/nginx/a.log f;
    error_log /var/log/nginx/e.log warn;
    location = /ws { proxy_read_timeout 300s; }
}
";
        let mut ports = 40000..;
        let dir = Path::new("/t");
        let r = rewrite_site(site, "127.0.0.1:9".parse().unwrap(), dir, || {
            ports.next().unwrap()
        });
        assert_eq!(r.listens, vec![(40000, true)]);
        assert_eq!((r.upstreams, r.certificates), (1, 1));
        let expected = "\
log_format f '$uri';
upstream app {
    server 127.0.0.1:9;

    keepalive 4;
}
server {
    listen 127.0.0.1:40000 ssl;
    ssl_certificate /t/cert.pem;
    ssl_certificate_key /t/key.pem;
    access_log /t/access.log f;
    error_log /t/error.log warn;
    location = /ws { proxy_read_timeout 300s; }
}
";
        assert_eq!(r.text, expected);
    }
}
