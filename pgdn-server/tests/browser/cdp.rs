//! Just enough of the Chrome DevTools Protocol to drive one page of a
//! headless Chromium: launch it on a fresh profile, navigate, evaluate
//! JavaScript and poll the page's state. Every step has a timeout; Drop
//! kills the browser and removes its profile.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for launching the browser and for one protocol call.
const CALL: Duration = Duration::from_secs(20);
/// Upper bound for [`Browser::wait_for`]; only reached when something is broken.
const WAIT: Duration = Duration::from_secs(15);
/// How often [`Browser::wait_for`] looks at the page.
const POLL: Duration = Duration::from_millis(50);

/// `/usr/bin/chromium`, else `chromium` on `PATH`.
pub fn chromium_path() -> Option<PathBuf> {
    let default = PathBuf::from("/usr/bin/chromium");
    if default.is_file() {
        return Some(default);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
}

/// The browser process and its profile directory, cleaned up on drop.
struct Process {
    child: Child,
    profile: PathBuf,
    /// The last lines of its stderr, for failure messages.
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL to the browser; its helper processes exit with it.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Helpers may still be writing for a moment after the browser died.
        for _ in 0..40 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One page of a headless Chromium, driven over the DevTools WebSocket.
pub struct Browser {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: Option<String>,
    next_id: u64,
    // Last, so that the connection is closed before the browser is killed.
    process: Process,
}

impl Browser {
    /// Launches Chromium and attaches to a new page. Panics with the
    /// command to run when Chromium is not installed.
    pub async fn launch() -> Browser {
        let exe = chromium_path().unwrap_or_else(|| {
            panic!(
                "this test drives a real browser, and Chromium is not installed \
                 (looked for /usr/bin/chromium and `chromium` on PATH). Install it with\n    \
                 apt-get install -y chromium\nor run `cargo xtask test`, which installs it."
            )
        });
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let profile =
            std::env::temp_dir().join(format!("pgdn-chromium-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&profile).expect("create the profile directory");
        let mut child = Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-proxy-server",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            // Keeps crash reports and caches inside the profile, not in $HOME.
            .env("XDG_CONFIG_HOME", profile.join("xdg-config"))
            .env("XDG_CACHE_HOME", profile.join("xdg-cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let mut process = Process {
            child,
            profile,
            stderr: Arc::default(),
        };
        // Reads stderr to the end (a full pipe would block the browser),
        // handing over the DevTools URL when it shows up.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tail = process.stderr.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                tail.push_back(line);
                if tail.len() > 30 {
                    tail.pop_front();
                }
            }
        });
        let url = match tokio::time::timeout(CALL, rx).await {
            Ok(Ok(url)) => url,
            _ => panic!(
                "Chromium did not print its DevTools URL (exit status: {:?}); stderr:\n{}",
                process.child.try_wait(),
                process.stderr_tail()
            ),
        };
        let (ws, _) = tokio::time::timeout(CALL, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .expect("DevTools connection in time")
            .expect("DevTools connection");
        let mut browser = Browser {
            ws,
            session: None,
            next_id: 0,
            process,
        };
        let target = browser
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = Some(attached["sessionId"].as_str().expect("a session").into());
        browser
    }

    fn stderr_tail(&self) -> String {
        self.process.stderr_tail()
    }

    /// Sends one command (to the page once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            msg["sessionId"] = json!(session);
        }
        let ws = &mut self.ws;
        let reply = tokio::time::timeout(CALL, async {
            ws.send(Message::text(msg.to_string())).await.ok()?;
            // Events are skipped: only the reply with our id counts.
            while let Some(Ok(frame)) = ws.next().await {
                if let Message::Text(text) = frame {
                    let v: Value = serde_json::from_str(text.as_str()).ok()?;
                    if v["id"] == id {
                        return Some(v);
                    }
                }
            }
            None
        })
        .await;
        match reply {
            Ok(Some(v)) if v.get("error").is_none() => v["result"].clone(),
            Ok(Some(v)) => panic!("{method} failed: {}", v["error"]),
            Ok(None) => panic!(
                "the DevTools connection ended during {method}; Chromium's stderr:\n{}",
                self.stderr_tail()
            ),
            Err(_) => panic!("{method} got no reply within {CALL:?}"),
        }
    }

    /// Loads `url` in the page (returns once it is committed, not loaded).
    pub async fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url})).await;
        assert!(r.get("errorText").is_none(), "navigating to {url}: {r}");
    }

    /// Evaluates `expr` (awaiting a promise) and returns its value as JSON,
    /// or the exception's description.
    pub async fn try_eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        match r.get("exceptionDetails") {
            Some(e) => Err(e["exception"]["description"]
                .as_str()
                .unwrap_or_else(|| e["text"].as_str().unwrap_or("exception"))
                .to_string()),
            None => Ok(r["result"].get("value").cloned().unwrap_or(Value::Null)),
        }
    }

    /// Evaluates `expr`; panics if it throws.
    pub async fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .await
            .unwrap_or_else(|e| panic!("`{expr}` threw: {e}"))
    }

    /// Evaluates `expr` every 50 ms until it yields a truthy value (which
    /// it returns), failing after 15 s with the last outcome and the demo
    /// page's connection log.
    pub async fn wait_for(&mut self, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = self.try_eval(expr).await;
            if let Ok(v) = &last {
                if truthy(v) {
                    return v.clone();
                }
            }
            if Instant::now() >= deadline {
                let log = self
                    .try_eval("JSON.stringify((window.pgdnDemo || {}).events || [], null, 1)")
                    .await;
                panic!(
                    "timed out after {WAIT:?} waiting for {what} (`{expr}`); last: {last:?}; \
                     page log: {}",
                    log.ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Saves a PNG of the page.
    pub async fn screenshot(&mut self, path: &Path) {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64_decode(r["data"].as_str().expect("image data"));
        std::fs::write(path, png).expect("write the screenshot");
    }
}

impl Process {
    fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// JavaScript's truthiness, for values that came back as JSON.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// Standard base64 (what CDP sends images in), no dependency for one use.
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | u32::from(value(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
