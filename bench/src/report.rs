//! `docs/benchmarks.md` and `docs/benchmarks.json`: the same figures, for people and tools.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::measure::{Row, Usage, CLIENT};
use crate::scenarios::{Memory, Outcome};

/// Where and when a run happened.
#[derive(Debug)]
pub(crate) struct Meta {
    pub date: String,
    pub commit: String,
    pub cpu_model: String,
    pub cores: usize,
    pub softhsm: String,
    pub quick: bool,
    pub store_dir: String,
    pub total_s: f64,
    pub load_before: String,
    pub load_after: String,
    pub rounds: usize,
    pub budget_s: f64,
}

/// The line above which `docs/benchmarks.md` is written by hand and kept across runs.
pub(crate) const MARKER: &str = "<!-- scripts/bench.sh writes everything below this line -->";

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The load generator's ceiling for `row`: calls per second it could issue if it had every
/// core to itself, from its CPU time per call.
fn client_ceiling(row: &Row, cores: usize) -> Option<f64> {
    let per = row.client_cpu_per_call()?;
    (per > 0.0).then(|| cores as f64 / per)
}

fn usage_json(u: &[Usage], row: &Row, cores: usize) -> Value {
    let secs = row.elapsed.as_secs_f64().max(1e-9);
    Value::Array(
        u.iter()
            .map(|u| {
                json!({
                    "process": u.name,
                    "cpu_seconds": u.cpu_s,
                    "cores_used": u.cpu_s / secs,
                    "share_of_machine": u.cpu_s / secs / cores.max(1) as f64,
                    "peak_rss_kib": u.peak_rss_kib,
                })
            })
            .collect(),
    )
}

fn row_json(row: &Row, cores: usize) -> Value {
    json!({
        "rate": row.rate(),
        "concurrency": row.conc,
        "calls": row.calls,
        "items": row.items,
        "seconds": row.elapsed.as_secs_f64(),
        "p50_ms": ms(row.p50()),
        "p99_ms": ms(row.p99()),
        "processes": usage_json(&row.usage, row, cores),
        "client_ceiling_calls_per_s": client_ceiling(row, cores),
    })
}

fn memory_json(m: &Memory) -> Value {
    json!({
        "process": m.process,
        "records": m.records,
        "peak_rss_kib": m.peak_rss_kib,
        "rss_anon_kib": m.rss_anon_kib,
        "rss_file_kib": m.rss_file_kib,
    })
}

pub(crate) fn json(meta: &Meta, outcomes: &[Outcome], failures: &[String]) -> Value {
    json!({
        "date": meta.date,
        "commit": meta.commit,
        "cpu_model": meta.cpu_model,
        "cores": meta.cores,
        "softhsm": meta.softhsm,
        "quick": meta.quick,
        "store_dir": meta.store_dir,
        "total_seconds": meta.total_s,
        "load_average_before": meta.load_before,
        "load_average_after": meta.load_after,
        "rounds": meta.rounds,
        "scenarios": outcomes.iter().map(|o| json!({
            "id": o.id,
            "title": o.title,
            "unit": o.unit,
            "system": row_json(&o.system, meta.cores),
            "limits": o.limits.iter().map(|(what, r)| {
                let mut v = row_json(r, meta.cores);
                v["what"] = json!(what);
                v
            }).collect::<Vec<_>>(),
            "ratio": o.ratio(),
            "round_ratio_range": o.round_range.map(|(a, b)| json!([a, b])),
            "target": o.target,
            "met": o.met(),
            "memory": o.memory.iter().map(memory_json).collect::<Vec<_>>(),
            "notes": o.notes,
        })).collect::<Vec<_>>(),
        "failures": failures,
    })
}

fn usage_cells(row: &Row, cores: usize) -> String {
    let secs = row.elapsed.as_secs_f64().max(1e-9);
    row.usage
        .iter()
        .filter(|u| u.cpu_s > 0.0 || u.name != CLIENT)
        .map(|u| {
            format!(
                "{} {:.2} cores, {:.0} MiB",
                u.name,
                u.cpu_s / secs,
                mib(u.peak_rss_kib)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
        + &client_ceiling(row, cores)
            .map(|c| format!("; client ceiling {c:.0} calls/s"))
            .unwrap_or_default()
}

pub(crate) fn markdown(meta: &Meta, outcomes: &[Outcome], failures: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Run of {} (commit {})\n\n\
         * machine: {} × {}; {}; load average {} before, {} after\n\
         * {}; stores under {} (fsync is real unless that is tmpfs); total {:.0} s\n\
         * every pair of rows ran interleaved in {} rounds of at most {:.1} s each; the ratio \
         is the system's rate over its limit's (the slowest limit when there are two), and \
         the range after it is the smallest and largest ratio of single rounds\n\
         * reproduce: `scripts/bench.sh{}`",
        meta.date,
        meta.commit,
        meta.cores,
        meta.cpu_model,
        meta.softhsm,
        meta.load_before,
        meta.load_after,
        if meta.quick {
            "**smoke run (`--quick`): the figures only show that the paths work**"
        } else {
            "full run"
        },
        meta.store_dir,
        meta.total_s,
        meta.rounds,
        meta.budget_s,
        if meta.quick { " --quick" } else { "" },
    );
    out.push_str(
        "\n| scenario | rate | p50 ms | p99 ms | limit measured in the same run | limit rate | ratio | target |\n\
         |---|---:|---:|---:|---|---:|---:|---:|\n",
    );
    for o in outcomes.iter().filter(|o| o.has_rate()) {
        let lim = o.limit();
        let ratio = match (o.ratio(), o.round_range) {
            (Some(r), Some((a, b))) => format!("**{r:.2}** ({a:.2}–{b:.2})"),
            (Some(r), None) => format!("**{r:.2}**"),
            _ => "—".into(),
        };
        let target = match (o.target, o.met()) {
            (Some(t), Some(true)) => format!("≥ {t} ✓"),
            (Some(t), Some(false)) => format!("≥ {t} ✗"),
            (Some(t), None) => format!("≥ {t}"),
            (None, _) => "report".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} {} | {:.2} | {:.2} | {} | {} | {} | {} |",
            o.title,
            o.system.rate(),
            o.unit,
            ms(o.system.p50()),
            ms(o.system.p99()),
            lim.map_or("—".to_owned(), |(w, _)| w.clone()),
            lim.map_or("—".to_owned(), |(_, r)| format!("{:.0}", r.rate())),
            ratio,
            target
        );
    }
    out.push_str(
        "\n### Where the cores went\n\nCPU used by each process during the row, in cores \
         (1.00 = one core busy the whole time), and its peak resident memory during the row. \
         The client is the benchmark process: the load generator, and the limit loops that \
         run in-process. Its ceiling is the calls per second it could issue with every core \
         to itself (cores ÷ its CPU time per call): a rate near it is the client's limit, \
         not the server's.\n\n| scenario | side | processes |\n|---|---|---|\n",
    );
    for o in outcomes.iter().filter(|o| o.has_rate()) {
        let _ = writeln!(
            out,
            "| {} | system | {} |",
            o.id,
            usage_cells(&o.system, meta.cores)
        );
        for (w, r) in &o.limits {
            let _ = writeln!(
                out,
                "| {} | limit: {} | {} |",
                o.id,
                w,
                usage_cells(r, meta.cores)
            );
        }
    }
    let mem: Vec<&Memory> = outcomes.iter().flat_map(|o| o.memory.iter()).collect();
    if !mem.is_empty() {
        out.push_str(
            "\n### Memory\n\n| process | records stored | peak RSS MiB | RSS anonymous MiB | RSS file-backed MiB (mapped store pages) |\n|---|---:|---:|---:|---:|\n",
        );
        for m in mem {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {:.1} | {:.1} |",
                m.process,
                m.records,
                mib(m.peak_rss_kib),
                mib(m.rss_anon_kib),
                mib(m.rss_file_kib)
            );
        }
    }
    let notes: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.notes.iter().map(move |n| format!("* {}: {n}", o.id)))
        .collect();
    if !notes.is_empty() {
        out.push_str("\n### Notes\n\n");
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    for f in failures {
        let _ = writeln!(out, "\n**FAILED:** {f}");
    }
    out
}
