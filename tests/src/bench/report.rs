//! The summary of one `scripts/bench.sh` run: every result file of its folder side by side with
//! the reference and the targets of issue 14, as a markdown table (printed, and pasted into
//! docs/BENCHMARKS.md) and one JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::intake::IntakeResult;
use super::memory::MemoryResult;
use super::reference::ReferenceResult;
use super::steps::StepsResult;
use super::{BENCH_PROCESS, WORKER, procfs, round};

/// The conversation sizes of a run, by the label of their result files.
pub const SIZES: [(&str, &str); 2] = [("3kb", "~3 KB"), ("10kb", "~10 KB")];

/// Targets (issue 14).
const STEPS_RATIO: f64 = 0.9;
const CPU_RATIO: f64 = 1.25;
const ROUND_TRIPS: f64 = 4.0;
const OVERHEAD_P50_MS: f64 = 2.0;
const OVERHEAD_P99_MS: f64 = 10.0;
const RSS_MIB: f64 = 512.0;
const IN_FLIGHT_RATIO: f64 = 0.9;
const INTAKE_PER_S: f64 = 5_000.0;
const INTAKE_P99_MS: f64 = 20.0;
/// "Flat": bytes per step of the ~10 KB run at most this times those of the ~3 KB run.
const FLAT_BYTES: f64 = 1.25;

/// Where and when.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    /// The date of the run.
    pub date: String,
    /// Cores.
    pub cores: usize,
    /// The CPU.
    pub cpu: String,
    /// Memory in GiB.
    pub memory_gib: f64,
    /// Redis's version.
    pub redis: String,
    /// RabbitMQ's version.
    pub rabbitmq: String,
}

impl Machine {
    /// This machine now, and the services' versions.
    pub async fn here(date: String, redis_url: &str) -> Self {
        let (redis, rabbitmq) = super::probe::service_versions(redis_url).await;
        Self {
            date,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu: procfs::cpu_model(),
            memory_gib: round(procfs::machine_memory_mib() / 1024.0, 1),
            redis,
            rabbitmq,
        }
    }
}

/// One conversation size: the fleet, the reference before it, and their ratios.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SizeSummary {
    /// The fleet.
    pub fleet: Option<StepsResult>,
    /// The reference.
    pub reference: Option<ReferenceResult>,
    /// Fleet ÷ reference steps/s.
    pub steps_ratio: Option<f64>,
    /// Fleet worker ÷ prototype CPU per step.
    pub cpu_ratio: Option<f64>,
}

/// Everything of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// The machine.
    pub machine: Machine,
    /// By conversation size.
    pub sizes: BTreeMap<String, SizeSummary>,
    /// `amqpbench` messages/s by queue type.
    pub amqpbench: BTreeMap<String, f64>,
    /// The reference on a classic step queue, when run.
    pub reference_classic: Option<ReferenceResult>,
    /// Sessions in flight.
    pub memory: Option<MemoryResult>,
    /// Intake.
    pub intake: Option<IntakeResult>,
}

impl Summary {
    /// Reads the result files of `dir`; a missing one is a part not run.
    pub fn read(dir: &Path, machine: Machine) -> anyhow::Result<Self> {
        let mut sizes = BTreeMap::new();
        for (label, _) in SIZES {
            let fleet: Option<StepsResult> = read_json(&dir.join(format!("steps-{label}.json")))?;
            let reference: Option<ReferenceResult> = read_json(&dir.join(format!("ref-{label}.json")))?;
            let ratio = |f: Option<f64>, r: Option<f64>| match (f, r) {
                (Some(f), Some(r)) if r > 0.0 => Some(round(f / r, 2)),
                _ => None,
            };
            let steps_ratio = ratio(fleet.as_ref().map(|f| f.steps_per_s), reference.as_ref().map(|r| r.steps_per_s));
            let cpu_ratio = ratio(fleet.as_ref().map(worker_cpu), reference.as_ref().map(prototype_cpu));
            sizes.insert(label.to_owned(), SizeSummary { fleet, reference, steps_ratio, cpu_ratio });
        }
        let amqpbench = ["quorum", "classic"]
            .iter()
            .filter_map(|kind| {
                let text = std::fs::read_to_string(dir.join(format!("amqp-{kind}.txt"))).ok()?;
                Some(((*kind).to_owned(), amqpbench_rate(&text)?))
            })
            .collect();
        Ok(Self {
            machine,
            sizes,
            amqpbench,
            reference_classic: read_json(&dir.join("ref-3kb-classic.json"))?,
            memory: read_json(&dir.join("memory.json"))?,
            intake: read_json(&dir.join("intake.json"))?,
        })
    }

    /// The summary as markdown.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "## Figures ({})\n", m.date);
        let _ = writeln!(
            md,
            "Machine: {} cores ({}), {} GiB; RabbitMQ {}, Redis {}; release build. Command: `scripts/bench.sh`.\n",
            m.cores, m.cpu, m.memory_gib, m.rabbitmq, m.redis
        );
        self.steps_table(&mut md);
        self.rabbitmq_table(&mut md);
        self.memory_table(&mut md);
        self.intake_table(&mut md);
        self.redis_detail(&mut md);
        md
    }

    fn steps_table(&self, md: &mut String) {
        let _ = writeln!(md, "### The step path, against the reference in the same run\n");
        let mut head = String::from("| |");
        let mut rule = String::from("|---|");
        for (_, name) in SIZES {
            let _ = write!(head, " fleet {name} | reference {name} | ratio |");
            rule += "---|---|---|";
        }
        let _ = writeln!(md, "{head} target |\n{rule}---|");
        let flat_bytes = self.flat_bytes();
        let rows: [(&str, &str, Row); 17] = [
            ("model request, mean", "", &|f, r, _| {
                (kb(f.map(|f| f.avg_request_bytes)), kb(r.map(|r| r.avg_request_bytes)), String::new())
            }),
            ("steps/s", "≥ 0.9×", &|f, r, s| {
                (num(f.map(|f| f.steps_per_s)), num(r.map(|r| r.steps_per_s)), times(s.steps_ratio, STEPS_RATIO, true))
            }),
            ("CPU per step: worker / prototype", "≤ 1.25×", &|f, r, s| {
                (us(f.map(worker_cpu)), us(r.map(prototype_cpu)), times(s.cpu_ratio, CPU_RATIO, false))
            }),
            ("CPU per step: whole machine", "", &|f, r, _| {
                (
                    us(f.and_then(|f| f.cpu_us_per_step.get(procfs::MACHINE).copied())),
                    us(r.and_then(|r| r.cpu_us_per_step.get(procfs::MACHINE).copied())),
                    String::new(),
                )
            }),
            ("CPU per step: dispatcher and the load (bench process)", "", &|f, _, _| {
                (us(f.and_then(|f| f.cpu_us_per_step.get(BENCH_PROCESS).copied())), "—".into(), String::new())
            }),
            ("CPU per step: RabbitMQ", "", &|f, r, _| cpu_cells(f, r, &["rabbitmq"], &["beam.smp"])),
            ("CPU per step: Redis", "", &|f, r, _| cpu_cells(f, r, &["redis-server"], &["redis-server"])),
            ("CPU per step: model and tool servers", "", &|f, r, _| {
                cpu_cells(f, r, &["model server", "tool server"], &["agentfleet-mode", "agentfleet-tool"])
            }),
            ("CPU per step: other processes on the machine", "", &|f, r, _| {
                (us(f.map(other_cpu)), us(r.and_then(|r| r.cpu_us_per_step.get("other").copied())), String::new())
            }),
            ("machine busy (cores)", "", &|f, r, _| {
                (dec(f.map(|f| f.machine_busy_cores)), dec(r.map(|r| r.machine_busy_cores)), String::new())
            }),
            ("Redis round trips per step", "≤ 4", &|f, r, _| {
                (
                    check(f.and_then(|f| f.redis_round_trips_per_step), "", ROUND_TRIPS, false),
                    r.map_or("n/a".into(), reference_round_trips),
                    String::new(),
                )
            }),
            ("Redis commands per step (scripts' own included)", "", &|f, r, _| {
                (dec(f.map(|f| f.redis_commands_per_step)), dec(r.map(|r| r.redis_commands_per_step)), String::new())
            }),
            ("bytes written to Redis per step", flat_bytes.as_str(), &|f, r, _| {
                (
                    bytes(f.map(|f| f.redis_bytes_in_per_step)),
                    bytes(r.map(|r| r.redis_bytes_in_per_step)),
                    String::new(),
                )
            }),
            ("RabbitMQ messages published per step", "", &|f, r, _| {
                (
                    dec(f.and_then(|f| f.rabbitmq_per_step.get(PUBLISHED).copied())),
                    dec(r.and_then(|r| r.rabbitmq_per_step.get(PUBLISHED).copied())),
                    String::new(),
                )
            }),
            ("RabbitMQ messages delivered per step", "", &|f, r, _| {
                (
                    dec(f.and_then(|f| f.rabbitmq_per_step.get(DELIVERED).copied())),
                    dec(r.and_then(|r| r.rabbitmq_per_step.get(DELIVERED).copied())),
                    String::new(),
                )
            }),
            ("overhead p50 at half load", "≤ 2 ms", &|f, _, _| {
                (
                    check(f.and_then(|f| f.overhead.as_ref()?.p50_ms), " ms", OVERHEAD_P50_MS, false),
                    "—".into(),
                    String::new(),
                )
            }),
            ("overhead p99 at half load", "≤ 10 ms", &|f, _, _| {
                (
                    check(f.and_then(|f| f.overhead.as_ref()?.p99_ms), " ms", OVERHEAD_P99_MS, false),
                    "—".into(),
                    String::new(),
                )
            }),
        ];
        for (name, target, row) in rows {
            let mut line = format!("| {name} |");
            for (label, _) in SIZES {
                let s = self.sizes.get(label).cloned().unwrap_or_default();
                let (f, r, ratio) = row(s.fleet.as_ref(), s.reference.as_ref(), &s);
                let _ = write!(line, " {f} | {r} | {ratio} |");
            }
            let _ = writeln!(md, "{line} {target} |");
        }
        let half: Vec<String> = SIZES
            .iter()
            .filter_map(|(label, name)| {
                let o = self.sizes.get(*label)?.fleet.as_ref()?.overhead.as_ref()?;
                Some(format!(
                    "{name}: paced for {} steps/s, ran {} steps/s, {} steps, {}",
                    o.target_steps_per_s,
                    o.steps_per_s,
                    o.steps,
                    busy(&o.busy)
                ))
            })
            .collect();
        if !half.is_empty() {
            let _ = writeln!(md, "\nHalf load: {}.", half.join("; "));
        }
        let _ = writeln!(md);
    }

    /// The bytes-written target's cell: the larger conversations' bytes per step over the smaller's
    /// (about 1 when they are flat in conversation length, while the requests grow about 3.5×).
    fn flat_bytes(&self) -> String {
        let bytes = |label: &str| self.sizes.get(label)?.fleet.as_ref().map(|f| f.redis_bytes_in_per_step);
        let (small, large) = (SIZES[0].0, SIZES[1].0);
        match (bytes(small), bytes(large)) {
            (Some(s), Some(l)) if s > 0.0 => {
                format!(
                    "flat in conversation length: {} ÷ {} = {}",
                    large,
                    small,
                    times(Some(round(l / s, 2)), FLAT_BYTES, false)
                )
            }
            _ => "flat in conversation length".into(),
        }
    }

    fn rabbitmq_table(&self, md: &mut String) {
        let _ = writeln!(md, "### RabbitMQ: quorum vs classic\n");
        let _ = writeln!(md, "| run | quorum | classic | classic ÷ quorum |\n|---|---|---|---|");
        let (q, c) = (self.amqpbench.get("quorum").copied(), self.amqpbench.get("classic").copied());
        let ratio = |q: Option<f64>, c: Option<f64>| match (q, c) {
            (Some(q), Some(c)) if q > 0.0 => format!("{:.2}×", c / q),
            _ => "n/a".into(),
        };
        let _ =
            writeln!(md, "| `amqpbench` (200 messages in flight), msg/s | {} | {} | {} |", num(q), num(c), ratio(q, c));
        let proto_q = self.sizes.get("3kb").and_then(|s| s.reference.as_ref()).map(|r| r.steps_per_s);
        let proto_c = self.reference_classic.as_ref().map(|r| r.steps_per_s);
        if proto_c.is_some() {
            let _ = writeln!(
                md,
                "| reference ~3 KB, steps/s | {} | {} | {} |",
                num(proto_q),
                num(proto_c),
                ratio(proto_q, proto_c)
            );
        }
        let _ = writeln!(md);
    }

    fn memory_table(&self, md: &mut String) {
        let _ = writeln!(md, "### Sessions in flight\n");
        let Some(m) = &self.memory else {
            let _ = writeln!(md, "Not run.\n");
            return;
        };
        let connections = if m.model_server_connections.is_empty() {
            "n/a".to_owned()
        } else {
            m.model_server_connections.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        };
        let ratio =
            if m.expected_steps_per_s > 0.0 { Some(m.plateau_steps_per_s / m.expected_steps_per_s) } else { None };
        let _ = writeln!(md, "| figure | value | target |\n|---|---|---|");
        let _ = writeln!(
            md,
            "| sessions (steps each), model latency | {} ({}), {} ms | 10,000, 2 s |",
            m.sessions, m.steps_per_session, m.model_latency_ms
        );
        let _ = writeln!(md, "| model request, mean | {} | ~10 KB |", kb(Some(m.avg_request_bytes)));
        let _ = writeln!(
            md,
            "| worker peak RSS | {} | ≤ 512 MiB |",
            check(Some(m.worker_peak_rss_mib), " MiB", RSS_MIB, false)
        );
        let _ = writeln!(md, "| most sessions live at once | {} | |", m.peak_live);
        let _ = writeln!(
            md,
            "| steps/s while live ≥ 95 % of that ({} s) vs in-flight ÷ latency | {} vs {} = {} | ≥ 0.9× |",
            m.plateau_s,
            num(Some(m.plateau_steps_per_s)),
            num(Some(m.expected_steps_per_s)),
            times(ratio.map(|r| round(r, 2)), IN_FLIGHT_RATIO, true)
        );
        let _ = writeln!(
            md,
            "| TCP connections to the model server, most at once | {} | a few dozen |",
            m.peak_model_connections
        );
        let _ = writeln!(md, "| the model server's own connection counters | {connections} | |");
        let _ =
            writeln!(md, "| time to submit them all / until the last ended | {} s / {} s | |", m.submit_s, m.wall_s);
        let _ = writeln!(md, "| the machine over the run | {} | |\n", busy(&m.busy));
    }

    fn intake_table(&self, md: &mut String) {
        let _ = writeln!(md, "### Intake\n");
        let Some(i) = &self.intake else {
            let _ = writeln!(md, "Not run.\n");
            return;
        };
        let _ = writeln!(md, "| figure | value | target |\n|---|---|---|");
        let _ = writeln!(md, "| `wrk` | {} threads, {} connections, {} s | |", i.threads, i.connections, i.seconds);
        let _ = writeln!(
            md,
            "| sessions created per second | {} | ≥ 5,000 |",
            check(Some(i.sessions_per_s), "", INTAKE_PER_S, true)
        );
        let _ = writeln!(md, "| latency p50 / p90 | {} ms / {} ms | |", dec(i.latency_p50_ms), dec(i.latency_p90_ms));
        let _ = writeln!(md, "| latency p99 | {} | ≤ 20 ms |", check(i.latency_p99_ms, " ms", INTAKE_P99_MS, false));
        let _ = writeln!(md, "| non-2xx answers, socket errors | {}, {} | 0 |", i.non_2xx, i.socket_errors);
        let _ = writeln!(md, "| the machine while wrk ran | {} | |\n", busy(&i.busy));
    }

    fn redis_detail(&self, md: &mut String) {
        let _ = writeln!(md, "### Redis per step, by command\n");
        let _ = writeln!(
            md,
            "| run | round trips (`MONITOR`) | commands (`INFO commandstats`, scripts' own included) |\n|---|---|---|"
        );
        for (label, name) in SIZES {
            let Some(s) = self.sizes.get(label) else { continue };
            if let Some(f) = &s.fleet {
                let _ = writeln!(
                    md,
                    "| fleet {name} | {} | {} |",
                    by_command(&f.redis_round_trips_by_command),
                    by_command(&f.redis_commands_by_command)
                );
            }
            if let Some(r) = &s.reference {
                let _ = writeln!(md, "| reference {name} | | {} |", by_command(&r.redis_commands_by_command));
            }
        }
        let _ = writeln!(md);
    }
}

/// One row of the step table: fleet, reference and ratio cells of one size.
type Row<'a> = &'a dyn Fn(Option<&StepsResult>, Option<&ReferenceResult>, &SizeSummary) -> (String, String, String);

/// RabbitMQ's counter of messages published to it.
const PUBLISHED: &str = "messages_received_total";
/// RabbitMQ's counter of messages it delivered.
const DELIVERED: &str = "messages_delivered_total";

/// CPU µs per step of the fleet's `fleet` groups and of the reference's `reference` processes.
fn cpu_cells(
    f: Option<&StepsResult>,
    r: Option<&ReferenceResult>,
    fleet: &[&str],
    reference: &[&str],
) -> (String, String, String) {
    let sum = |map: &BTreeMap<String, f64>, keys: &[&str]| keys.iter().filter_map(|k| map.get(*k)).sum::<f64>();
    (us(f.map(|f| sum(&f.cpu_us_per_step, fleet))), us(r.map(|r| sum(&r.cpu_us_per_step, reference))), String::new())
}

/// The machine's CPU per step that none of the run's processes used: other work on the machine.
fn other_cpu(f: &StepsResult) -> f64 {
    let machine = f.cpu_us_per_step.get(procfs::MACHINE).copied().unwrap_or(0.0);
    let ours: f64 = f.cpu_us_per_step.iter().filter(|(k, _)| *k != procfs::MACHINE).map(|(_, v)| v).sum();
    (machine - ours).max(0.0)
}

fn worker_cpu(f: &StepsResult) -> f64 {
    f.cpu_us_per_step.get(WORKER).copied().unwrap_or(0.0)
}

/// The reference's round trips: its scripts (`evalsha`; three a step by design) and, once a
/// session, the pipeline that creates the next one.
fn reference_round_trips(r: &ReferenceResult) -> String {
    let scripts: f64 = ["evalsha", "eval"].iter().filter_map(|c| r.redis_commands_by_command.get(*c)).sum();
    format!("{} scripts + 1 pipeline a session", round(scripts, 2))
}

fn prototype_cpu(r: &ReferenceResult) -> f64 {
    r.cpu_us_per_step.get("steploop-proto").copied().unwrap_or(0.0)
}

/// `file` as `T`, or `None` when there is no such file.
fn read_json<T: DeserializeOwned>(file: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read_to_string(file) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", file.display())),
    }
}

/// The rate of `amqpbench`'s line (`quorum tokens=200: 18942 steps/s`).
fn amqpbench_rate(text: &str) -> Option<f64> {
    text.lines().find_map(|l| l.split_once(": ")?.1.strip_suffix(" steps/s")?.trim().parse().ok())
}

/// How busy the machine was, and how much of it was work outside the run.
fn busy(b: &procfs::Busy) -> String {
    format!("{} cores busy, {} of them outside the run", b.machine_cores, b.other_cores)
}

fn num(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| thousands(x.round() as i64))
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn dec(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{}", round(x, 2)))
}

fn us(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{} µs", x.round()))
}

fn kb(x: Option<f64>) -> String {
    x.filter(|x| *x > 0.0).map_or("n/a".into(), |x| format!("{:.1} KB", x / 1024.0))
}

fn bytes(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{} B", thousands(x.round() as i64)))
}

/// `x` in `unit` and whether it meets `target` (at least it when `at_least`, else at most).
fn check(x: Option<f64>, unit: &str, target: f64, at_least: bool) -> String {
    match x {
        None => "n/a".into(),
        Some(x) => format!("{}{unit} {}", round(x, 2), mark(x, target, at_least)),
    }
}

/// A ratio `x`× and whether it meets `target`.
fn times(x: Option<f64>, target: f64, at_least: bool) -> String {
    x.map_or("n/a".into(), |x| format!("{x}× {}", mark(x, target, at_least)))
}

fn mark(x: f64, target: f64, at_least: bool) -> &'static str {
    if (at_least && x >= target) || (!at_least && x <= target) { "✅" } else { "❌" }
}

fn by_command(calls: &BTreeMap<String, f64>) -> String {
    let mut calls: Vec<(&String, &f64)> = calls.iter().filter(|(_, n)| **n >= 0.005).collect();
    calls.sort_by(|a, b| b.1.total_cmp(a.1));
    calls.iter().map(|(c, n)| format!("{c} {}", round(**n, 2))).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_amqpbench() {
        assert_eq!(amqpbench_rate("quorum tokens=200: 18942 steps/s\n"), Some(18942.0));
        assert_eq!(amqpbench_rate("nothing"), None);
    }

    #[test]
    fn formats_figures() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(check(Some(3.2), "", 4.0, false), "3.2 ✅");
        assert_eq!(check(Some(1.5), " ms", 2.0, false), "1.5 ms ✅");
        assert_eq!(times(Some(0.49), 0.9, true), "0.49× ❌");
        assert_eq!(kb(Some(3174.0)), "3.1 KB");
    }

    #[test]
    fn an_empty_folder_gives_a_summary_of_parts_not_run() {
        let dir = std::env::temp_dir().join(format!("bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let summary = Summary::read(&dir, Machine::default()).unwrap_or_default();
        let md = summary.markdown();
        assert!(md.contains("| steps/s |") && md.contains("Not run."), "{md}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
