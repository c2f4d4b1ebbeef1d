//! The process's own numbers for `/metrics` under their standard names
//! (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
//! `process_open_fds`, `process_max_fds`, `process_start_time_seconds`),
//! read from `/proc` at scrape time; on other systems there are none.
//!
//! Hand-written on purpose: `metrics-process` reports to the `metrics`
//! crate, not to prometheus-client, and `procfs` would bring rustix and a
//! tree of its own crates for five numbers from four small files. The
//! clock tick and page size, which a C program gets from `sysconf`, come
//! from the kernel's auxiliary vector (`/proc/self/auxv`), so no `unsafe`
//! call is needed.

/// One reading of the process's numbers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProcessStats {
    /// Resident memory, in bytes.
    pub(crate) resident_bytes: u64,
    /// User plus system CPU time, in seconds.
    pub(crate) cpu_seconds: f64,
    /// Open file descriptors.
    pub(crate) open_fds: u64,
    /// The soft limit on open file descriptors (`None`: unlimited).
    pub(crate) max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    pub(crate) start_time_seconds: f64,
}

/// Reads the numbers now; `None` where `/proc` is not there or not
/// readable.
#[cfg(target_os = "linux")]
pub(crate) fn read() -> Option<ProcessStats> {
    use std::fs;
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let auxv = fs::read("/proc/self/auxv").ok()?;
    let boot = fs::read_to_string("/proc/stat").ok()?;
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let open_fds = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    // The auxiliary vector's AT_PAGESZ (6) and AT_CLKTCK (17).
    let page_size = auxv_value(&auxv, 6)?;
    let ticks = auxv_value(&auxv, 17).filter(|t| *t > 0)?;
    let boot_time = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse::<u64>()
        .ok()?;
    let stat = parse_stat(&stat)?;
    Some(ProcessStats {
        resident_bytes: stat.rss_pages * page_size,
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks as f64,
        open_fds,
        max_fds: parse_max_fds(&limits)?,
        start_time_seconds: boot_time as f64 + stat.start_ticks as f64 / ticks as f64,
    })
}

/// Reads the numbers now; `None`: there is no `/proc` here.
#[cfg(not(target_os = "linux"))]
pub(crate) fn read() -> Option<ProcessStats> {
    None
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    rss_pages: u64,
}

/// Parses `/proc/<pid>/stat` (proc(5)): the command name, field 2, is in
/// parentheses and may itself hold spaces and parentheses, so the fields
/// are counted from the last `)`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_stat(stat: &str) -> Option<Stat> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    // `rest` starts with field 3 (state): field n is at index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
        rss_pages: field(24)?,
    })
}

/// The soft limit of "Max open files" in `/proc/<pid>/limits`; `Some(None)`
/// when unlimited.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_max_fds(limits: &str) -> Option<Option<u64>> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(None),
        n => n.parse().ok().map(Some),
    }
}

/// The value of entry `key` of an auxiliary vector (pairs of native
/// words).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| -> u64 {
        let mut w = [0u8; WORD];
        w.copy_from_slice(b);
        usize::from_ne_bytes(w) as u64
    };
    auxv.chunks_exact(2 * WORD)
        .map(|pair| (word(&pair[..WORD]), word(&pair[WORD..])))
        .take_while(|(k, _)| *k != 0)
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis in it.
        let line = "4242 (pgdn (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 50 0 0 20 0 9 0 123456 987654321 3000 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime: 250,
                stime: 50,
                start_ticks: 123456,
                rss_pages: 3000,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn max_fds_is_the_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             63704                63704                processes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(Some(1024)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_fds(unlimited), Some(None));
    }

    #[test]
    fn auxv_entries_are_found_by_key() {
        let mut auxv = Vec::new();
        for (k, v) in [(6usize, 4096usize), (17, 100), (0, 0), (17, 1)] {
            auxv.extend_from_slice(&k.to_ne_bytes());
            auxv.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(auxv_value(&auxv, 6), Some(4096));
        assert_eq!(auxv_value(&auxv, 17), Some(100), "stops at AT_NULL");
        assert_eq!(auxv_value(&auxv, 99), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_plausibly() {
        let _file = std::fs::File::open("/proc/self/stat").unwrap();
        let p = read().expect("/proc is readable");
        assert!(p.resident_bytes > 1024 * 1024, "{p:?}");
        assert!(p.open_fds >= 1, "{p:?}");
        assert!(p.max_fds.is_none_or(|m| m >= p.open_fds), "{p:?}");
        assert!(p.cpu_seconds >= 0.0, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started within the last day, and not in the future (clock ticks
        // are coarse: allow a second).
        assert!(
            p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86400.0,
            "{p:?} vs {now}"
        );
    }
}
