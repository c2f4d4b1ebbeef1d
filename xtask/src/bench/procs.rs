//! The server processes under test: starting them, reading their CPU time
//! and resident memory from `/proc`, and stopping them.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A server process started by the bench. Dropping it kills the process if
/// it is still running, so that a failing bench leaves nothing behind.
pub(crate) struct ServerProcess {
    /// What the process is, for messages.
    name: &'static str,
    child: Child,
    /// The child's stdin, held open: the baseline server exits when it closes.
    stdin: Option<ChildStdin>,
}

/// The CPUs of the servers under test and of the bench (`--no-pin` turns
/// this off): each server on one CPU, the bench on the others, so that
/// the load generator does not take CPU time from the server it measures
/// (issue 11's own figures were taken that way). Set once, before the
/// bench starts any thread of its own.
#[cfg(target_os = "linux")]
pub(crate) struct Pinning {
    server: rustix::thread::CpuSet,
    bench: rustix::thread::CpuSet,
}

#[cfg(target_os = "linux")]
static PINNING: std::sync::OnceLock<Pinning> = std::sync::OnceLock::new();

#[cfg(target_os = "linux")]
impl Pinning {
    /// Puts every thread of the bench on the CPUs it may use but the
    /// first, and keeps the first for the servers it starts from now on.
    /// Says where each runs, or why nothing is pinned (fewer than 2 CPUs).
    pub(crate) fn apply() -> String {
        use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
        let allowed = match sched_getaffinity(None) {
            Ok(set) => set,
            Err(e) => return format!("not pinned (sched_getaffinity: {e})"),
        };
        let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
            .filter(|&c| allowed.is_set(c))
            .collect();
        let Some((&first, rest)) = cpus.split_first().filter(|(_, rest)| !rest.is_empty()) else {
            return "not pinned (one CPU)".into();
        };
        let mut server = CpuSet::new();
        server.set(first);
        let mut bench = CpuSet::new();
        for &c in rest {
            bench.set(c);
        }
        // Every thread the bench has so far; later ones inherit the mask
        // of the thread that starts them.
        let tasks = std::fs::read_dir("/proc/self/task").map_err(|e| e.to_string());
        let threads = tasks.map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .collect::<Vec<_>>()
        });
        let threads = match threads {
            Ok(t) => t,
            Err(e) => return format!("not pinned (/proc/self/task: {e})"),
        };
        for tid in threads {
            let pid = rustix::process::Pid::from_raw(tid);
            if let Err(e) = sched_setaffinity(pid, &bench) {
                return format!("not pinned (sched_setaffinity: {e})");
            }
        }
        let _ = PINNING.set(Pinning { server, bench });
        let list = |cpus: &[usize]| {
            cpus.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "each server under test pinned to CPU {first}, the bench to CPU {}",
            list(rest)
        )
    }

    /// Runs `spawn` with the calling thread on the servers' CPU, so that
    /// the process it starts inherits that CPU, then puts the thread back.
    fn spawning<T>(spawn: impl FnOnce() -> T) -> T {
        let Some(p) = PINNING.get() else {
            return spawn();
        };
        let _ = rustix::thread::sched_setaffinity(None, &p.server);
        let out = spawn();
        let _ = rustix::thread::sched_setaffinity(None, &p.bench);
        out
    }
}

/// Without Linux's affinity calls, nothing is pinned.
#[cfg(not(target_os = "linux"))]
pub(crate) struct Pinning;

#[cfg(not(target_os = "linux"))]
impl Pinning {
    pub(crate) fn apply() -> String {
        "not pinned (Linux only)".into()
    }

    fn spawning<T>(spawn: impl FnOnce() -> T) -> T {
        spawn()
    }
}

impl ServerProcess {
    /// Starts `cmd` with piped stdin/stdout and waits (at most `timeout`)
    /// for a stdout line starting with `prefix`; returns the process and
    /// that line. The rest of stdout is drained in the background. With
    /// [`Pinning`] applied, the process runs on the servers' CPU.
    pub(crate) fn start(
        name: &'static str,
        mut cmd: Command,
        prefix: &'static str,
        timeout: Duration,
    ) -> Result<(ServerProcess, String), String> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = Pinning::spawning(|| cmd.spawn())
            .map_err(|e| format!("could not start {name} ({cmd:?}): {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut process = ServerProcess { name, child, stdin };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with(prefix)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        match rx.recv_timeout(timeout) {
            Ok(line) => Ok((process, line)),
            Err(_) => {
                process.kill();
                Err(format!(
                    "{name} did not print `{prefix}...` within {timeout:?}"
                ))
            }
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server: closes its stdin and sends SIGTERM, then waits at
    /// most `grace` before killing it. Returns how it exited.
    pub(crate) fn stop(mut self, grace: Duration) -> String {
        drop(self.stdin.take());
        // SIGTERM through kill(1): the workspace forbids `unsafe`, and this
        // is all the signalling the bench needs.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return format!("{} exited: {status}", self.name),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    self.kill();
                    return format!("{} did not exit within {grace:?}: killed", self.name);
                }
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// CPU time (user + system) used so far by process `pid`, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime field 14, stime field 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("malformed /proc/{pid}/stat"))
    };
    Ok(field(11)? + field(12)?)
}

/// CPU time of the bench process itself, in clock ticks.
pub(crate) fn own_cpu_ticks() -> u64 {
    cpu_ticks(std::process::id()).unwrap_or(0)
}

/// Resident set size of process `pid` (`VmRSS`), in KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
pub(crate) fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// One line describing the machine: cores, CPU model, memory, kernel.
pub(crate) fn machine_description() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string());
    format!("{cores} cores ({model}), {mem_gib:.1} GiB RAM, Linux {kernel}")
}

/// The load average over 1, 5 and 15 minutes (`/proc/loadavg`), or
/// "unknown".
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "),
    )
}

/// The machine's CPU time so far, every CPU together (the `cpu` line of
/// `/proc/stat`), in clock ticks: (all of it, the part the hypervisor took
/// for other guests: steal).
fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user and nice).
    let all = fields.iter().take(8).sum();
    Some((all, *fields.get(7)?))
}

/// CPU time the hypervisor took from this virtual machine since
/// [`Steal::start`]: on a shared host it explains a slow round better
/// than anything the bench or the server did.
pub(crate) struct Steal(Option<(u64, u64)>);

impl Steal {
    pub(crate) fn start() -> Steal {
        Steal(machine_cpu_ticks())
    }

    /// Steal as a percentage of all CPU time since the start, if known.
    pub(crate) fn percent(&self) -> Option<f64> {
        let ((all0, steal0), (all1, steal1)) = (self.0?, machine_cpu_ticks()?);
        let all = all1.checked_sub(all0)?;
        (all > 0).then(|| steal1.saturating_sub(steal0) as f64 * 100.0 / all as f64)
    }
}

/// Steal percentages, one per server run, for a report: "0.4 %, 12.0 %"
/// ("unknown" where /proc/stat could not be read).
pub(crate) fn describe_steal(steal: &[Option<f64>]) -> String {
    steal
        .iter()
        .map(|s| s.map_or("unknown".into(), |p| format!("{p:.1} %")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The output of `rustc -V`, or "rustc (unknown)".
pub(crate) fn rustc_version() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Command::new(rustc)
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "rustc (unknown)".into(), |s| s.trim().to_string())
}

/// `git describe --always --dirty` of the workspace, or "unknown".
pub(crate) fn git_revision() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_string())
}

/// The id of a child process of this one whose command name (`comm`, at
/// most 15 bytes) is `comm`, if there is one: how the bench finds the
/// redis-server that pgdn-testkit started for it.
pub(crate) fn child_pid(comm: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1;
        // After the name: state, then the parent's id.
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == me && name == comm).then_some(pid)
    })
}
