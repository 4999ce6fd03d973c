//! Running one workload for a bounded number of operations and a bounded time, and what each
//! process (the load generator included) spent on it: CPU seconds and peak resident memory.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

/// How long and how many: a measurement stops at whichever limit comes first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_ops: usize,
    pub budget: Duration,
    pub warmup: usize,
}

impl Limits {
    /// The share of these limits for one of `n` interleaved rounds.
    pub(crate) fn per_round(self, n: usize) -> Limits {
        let n = n.max(1);
        Limits {
            max_ops: (self.max_ops / n).max(1),
            budget: self.budget / n as u32,
            warmup: self.warmup,
        }
    }
}

/// One measured workload.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub conc: usize,
    pub calls: usize,
    pub items: usize,
    pub elapsed: Duration,
    /// Per-call latencies, sorted.
    pub lat: Vec<Duration>,
    /// What each watched process spent (see [`Probe`]).
    pub usage: Vec<Usage>,
}

impl Row {
    /// Items (DEKs, messages, pages) per second.
    pub(crate) fn rate(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn p50(&self) -> Duration {
        percentile(&self.lat, 50)
    }

    pub(crate) fn p99(&self) -> Duration {
        percentile(&self.lat, 99)
    }

    /// One row from several rounds of the same workload: calls, items, time and CPU add up;
    /// the peak memory is the highest.
    pub(crate) fn merge(rounds: Vec<Row>) -> Result<Row> {
        let mut it = rounds.into_iter();
        let mut acc = it.next().ok_or_else(|| anyhow!("no rounds"))?;
        for r in it {
            acc.calls += r.calls;
            acc.items += r.items;
            acc.elapsed += r.elapsed;
            acc.lat.extend(r.lat);
            for u in r.usage {
                match acc.usage.iter_mut().find(|a| a.name == u.name) {
                    Some(a) => {
                        a.cpu_s += u.cpu_s;
                        a.peak_rss_kib = a.peak_rss_kib.max(u.peak_rss_kib);
                    }
                    None => acc.usage.push(u),
                }
            }
        }
        acc.lat.sort_unstable();
        Ok(acc)
    }

    /// A row for one long operation (a job) that moved `items` in `elapsed`.
    pub(crate) fn single(items: usize, elapsed: Duration) -> Row {
        Row {
            conc: 1,
            calls: 1,
            items,
            elapsed,
            lat: vec![elapsed],
            usage: Vec::new(),
        }
    }

    /// The load generator's CPU seconds per call, when it was watched.
    pub(crate) fn client_cpu_per_call(&self) -> Option<f64> {
        let c = self.usage.iter().find(|u| u.name == CLIENT)?;
        (self.calls > 0).then(|| c.cpu_s / self.calls as f64)
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted.get(idx).copied().unwrap_or_default()
}

fn finish_row(
    name: &str,
    conc: usize,
    items_per_call: usize,
    elapsed: Duration,
    mut lat: Vec<Duration>,
) -> Result<Row> {
    if lat.is_empty() {
        bail!("{name}: no operation completed");
    }
    lat.sort_unstable();
    Ok(Row {
        conc,
        calls: lat.len(),
        items: lat.len() * items_per_call,
        elapsed,
        lat,
        usage: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The name under which the benchmark process itself (the load generator, and the in-process
/// limit loops) is reported.
pub(crate) const CLIENT: &str = "bench (client)";

/// What one process spent on one measurement.
#[derive(Clone, Debug)]
pub(crate) struct Usage {
    pub name: String,
    pub cpu_s: f64,
    /// Peak resident set (`VmHWM`) during the measurement, KiB; 0 when unreadable.
    pub peak_rss_kib: u64,
}

/// Watches processes over one measurement: their peak RSS is reset at the start (writing `5`
/// to `/proc/PID/clear_refs`), their CPU time read at both ends.
pub(crate) struct Probe {
    procs: Vec<(String, u32, f64)>,
}

/// `/proc` times are in USER_HZ ticks, which Linux fixes at 100 for user space.
const TICKS_PER_SEC: f64 = 100.0;

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are
    // numbered from 3, so utime and stime (14 and 15) are the 12th and 13th of the rest.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / TICKS_PER_SEC
}

/// A `kB` field of `/proc/PID/status`.
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl Probe {
    /// Starts watching `procs` (name, pid) and this process.
    pub(crate) fn start(procs: &[(String, u32)]) -> Probe {
        let mut all = vec![(CLIENT.to_owned(), std::process::id())];
        all.extend(procs.iter().cloned());
        Probe {
            procs: all
                .into_iter()
                .map(|(n, pid)| {
                    // Best effort: without it the peak is the process's lifetime peak.
                    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
                    let cpu = cpu_seconds(pid);
                    (n, pid, cpu)
                })
                .collect(),
        }
    }

    /// What each watched process spent since [`Probe::start`].
    pub(crate) fn finish(self) -> Vec<Usage> {
        self.procs
            .into_iter()
            .map(|(name, pid, cpu)| Usage {
                name,
                cpu_s: (cpu_seconds(pid) - cpu).max(0.0),
                peak_rss_kib: status_kib(pid, "VmHWM:"),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Runners

/// Runs `f(worker, op)` from `conc` tasks until `lim.max_ops` calls were started or the time
/// budget is spent. The first error stops the measurement.
pub(crate) async fn run_async<F, Fut>(
    name: &str,
    conc: usize,
    lim: Limits,
    items_per_call: usize,
    f: F,
) -> Result<Row>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let f = Arc::new(f);
    for i in 0..lim.warmup {
        f(i % conc.max(1), usize::MAX - i)
            .await
            .with_context(|| format!("{name}: warm-up"))?;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + lim.budget;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..conc {
        let f = Arc::clone(&f);
        let next = Arc::clone(&next);
        set.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= lim.max_ops || Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                f(w, i).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = set.join_next().await {
        lat.extend(
            r.context("benchmark task")?
                .with_context(|| name.to_owned())?,
        );
    }
    finish_row(name, conc, items_per_call, start.elapsed(), lat)
}

/// [`run_async`] for blocking closures on `conc` OS threads.
pub(crate) fn run_threads<F>(
    name: &str,
    conc: usize,
    lim: Limits,
    items_per_call: usize,
    f: F,
) -> Result<Row>
where
    F: Fn(usize, usize) -> Result<()> + Sync,
{
    for i in 0..lim.warmup {
        f(i % conc.max(1), usize::MAX - i).with_context(|| format!("{name}: warm-up"))?;
    }
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let deadline = start + lim.budget;
    let lat = std::thread::scope(|s| -> Result<Vec<Duration>> {
        let handles: Vec<_> = (0..conc)
            .map(|w| {
                let (f, next) = (&f, &next);
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= lim.max_ops || Instant::now() >= deadline {
                            break;
                        }
                        let t = Instant::now();
                        f(w, i)?;
                        lat.push(t.elapsed());
                    }
                    Ok(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            let part = h
                .join()
                .map_err(|_| anyhow!("{name}: a benchmark thread panicked"))?
                .with_context(|| name.to_owned())?;
            all.extend(part);
        }
        Ok(all)
    })?;
    finish_row(name, conc, items_per_call, start.elapsed(), lat)
}
