//! What `/proc` says about the processes of a run: CPU time, peak memory, machine load and the TCP
//! connections to a port. Linux only, like the fleet's deployment; a process that is gone reads as
//! zero rather than failing a run that is otherwise measured.

use std::collections::BTreeMap;

/// The unit of `/proc/<pid>/stat` and `/proc/stat` times: Linux reports them in USER_HZ, 100 on
/// every mainstream architecture whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) of a process so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) / USER_HZ
}

/// CPU seconds (user + system) of the children of a process that have ended and been waited
/// for (`cutime` and `cstime` of `/proc/<pid>/stat`).
pub fn ended_children_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // cutime and cstime are fields 16 and 17 of stat, 14 and 15 after the name and state.
    (ticks(13) + ticks(14)) / USER_HZ
}

/// A `VmXXX:` line of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0.0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Peak resident memory of a process in MiB (`VmHWM`).
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Resident memory of a process now, in MiB (`VmRSS`).
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// Pids of every process whose command name (`/proc/<pid>/comm`, cut to 15 characters) is `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name))
        .collect()
}

/// Named groups of processes whose CPU a run reports: the worker, the broker, Redis, …
#[derive(Debug, Clone, Default)]
pub struct Groups(Vec<(String, Vec<u32>)>);

impl Groups {
    /// Adds a group of explicit pids.
    pub fn with(mut self, name: &str, pids: Vec<u32>) -> Self {
        self.0.push((name.to_owned(), pids));
        self
    }

    /// Adds the processes named `comm` now (see [`pids_named`]).
    pub fn with_named(self, name: &str, comm: &str) -> Self {
        self.with(name, pids_named(comm))
    }

    /// CPU seconds used so far by each group, and by the whole machine (`machine`, busy time over
    /// every core).
    pub fn cpu(&self) -> BTreeMap<String, f64> {
        let mut used: BTreeMap<String, f64> =
            self.0.iter().map(|(name, pids)| (name.clone(), pids.iter().map(|p| cpu_seconds(*p)).sum())).collect();
        used.insert(MACHINE.to_owned(), machine_busy_seconds());
        used
    }
}

/// How busy the machine was over a span, and how much of that was none of the run's processes:
/// the figures of a span with other work on the machine are not the run's alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Busy {
    /// Busy cores, all processes.
    pub machine_cores: f64,
    /// Busy cores of processes outside the run's groups.
    pub other_cores: f64,
}

impl Busy {
    /// From two [`Groups::cpu`] readings `secs` apart.
    pub fn between(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, secs: f64) -> Self {
        let used = |k: &String| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
        let machine = used(&MACHINE.to_owned());
        let ours: f64 = after.keys().filter(|k| *k != MACHINE).map(used).sum();
        let cores = |x: f64| if secs > 0.0 { (x / secs * 100.0).round() / 100.0 } else { 0.0 };
        Self { machine_cores: cores(machine), other_cores: cores((machine - ours).max(0.0)) }
    }
}

/// The key of the whole machine's busy time in [`Groups::cpu`].
pub const MACHINE: &str = "machine";

/// Busy CPU seconds of the whole machine since boot, over every core (`/proc/stat`: all but idle
/// and iowait).
pub fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0.0 };
    let ticks: Vec<f64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let busy: f64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy / USER_HZ
}

/// Established TCP connections (IPv4 and IPv6) whose far end is `port` on this machine: the
/// client side of every connection to a local server on `port`.
pub fn connections_to(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|table| established_to(&table, port))
        .sum()
}

/// [`connections_to`] over one `/proc/net/tcp` table.
fn established_to(table: &str, port: u16) -> usize {
    const ESTABLISHED: &str = "01";
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields.get(2).and_then(|a| a.rsplit_once(':')).map(|(_, p)| p);
            fields.get(3) == Some(&ESTABLISHED)
                && remote_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
        })
        .count()
}

/// Total memory of the machine in MiB (`MemTotal`).
pub fn machine_memory_mib() -> f64 {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else { return 0.0 };
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The CPU's model name (`/proc/cpuinfo`), or `unknown`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_owned()))
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_established_connections_to_the_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
            0: 0100007F:C350 0100007F:4772 01 00000000:00000000\n\
            1: 0100007F:C351 0100007F:4772 06 00000000:00000000\n\
            2: 0100007F:4772 0100007F:C350 01 00000000:00000000\n\
            3: 0100007F:C352 0100007F:4772 01 00000000:00000000\n";
        // 0x4772 = 18290: two client sockets established, one in TIME_WAIT, one server socket.
        assert_eq!(established_to(table, 18290), 2);
    }

    #[test]
    fn busy_time_outside_the_groups_is_other_work() {
        let before = BTreeMap::from([(MACHINE.to_owned(), 10.0), ("worker".to_owned(), 1.0)]);
        let after = BTreeMap::from([(MACHINE.to_owned(), 14.0), ("worker".to_owned(), 2.0)]);
        assert_eq!(Busy::between(&before, &after, 2.0), Busy { machine_cores: 2.0, other_cores: 1.5 });
    }

    #[test]
    fn this_process_uses_cpu_and_memory() {
        let me = std::process::id();
        let groups = Groups::default().with("me", vec![me]);
        let spin: u64 = (0..5_000_000u64).fold(0, |a, b| a.wrapping_add(b * b));
        assert!(spin > 0);
        assert!(groups.cpu()["me"] >= 0.0 && peak_rss_mib(me) > 0.0 && rss_mib(me) > 0.0);
    }
}
