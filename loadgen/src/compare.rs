//! `loadgen compare BASELINE NEW --max-regression 10%`: the benchmark regression report.
//!
//! Every numeric figure under `latency`, `rates`, `counters`, `memory` and `cpu` is compared. Lower
//! is better for latencies, memory, server CPU per message, `reconnect_all_ms` and the error
//! counters; higher is better for the
//! other rates; the remaining counters (sent, delivered, ...) are shown but never judged. A
//! figure that worsens by more than the bound is a regression, and so is any missing, duplicated
//! or out-of-order message where the baseline had none. Exit status 1 on any regression.

use serde_json::Value;
use std::path::Path;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
    Neither,
}

fn direction(section: &str, key: &str) -> Better {
    match section {
        "latency" | "memory" => Better::Lower,
        "rates" => Better::Higher,
        "cpu" if key == "server_cpu_us_per_msg" => Better::Lower,
        "counters"
            if matches!(
                key,
                "missing" | "duplicated" | "out_of_order" | "errors" | "skipped_offline" | "reconnect_all_ms"
            ) =>
        {
            Better::Lower
        }
        _ => Better::Neither,
    }
}

/// One compared figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `section.name[.field]`.
    pub metric: String,
    /// Baseline value.
    pub base: f64,
    /// New value.
    pub new: f64,
    /// Relative change in percent (None when the baseline is 0).
    pub change_pct: Option<f64>,
    /// Worse beyond the bound.
    pub regression: bool,
}

fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, f64)>) {
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.push((prefix.to_string(), f));
            }
        }
        Value::Object(m) => {
            for (k, v) in m {
                leaves(&format!("{prefix}.{k}"), v, out);
            }
        }
        _ => {}
    }
}

/// Compares two summaries with a bound in percent.
pub fn compare(base: &Value, new: &Value, bound_pct: f64) -> Vec<Row> {
    let mut rows = Vec::new();
    for section in ["latency", "rates", "counters", "memory", "cpu"] {
        let mut b = Vec::new();
        leaves(section, &base[section], &mut b);
        let mut n = Vec::new();
        leaves(section, &new[section], &mut n);
        for (metric, bv) in b {
            let Some((_, nv)) = n.iter().find(|(m, _)| *m == metric) else {
                continue;
            };
            let key = metric.split('.').nth(1).unwrap_or("");
            // Sample counts of latencies are context, not quality.
            let dir = if metric.ends_with(".count") {
                Better::Neither
            } else {
                direction(section, key)
            };
            let change_pct = (bv != 0.0).then(|| (nv - bv) / bv.abs() * 100.0);
            let worse_pct = match (dir, change_pct) {
                (Better::Lower, Some(c)) => c,
                (Better::Higher, Some(c)) => -c,
                _ => 0.0,
            };
            let from_zero = dir == Better::Lower && bv == 0.0 && *nv > 0.0 && section == "counters";
            rows.push(Row {
                metric,
                base: bv,
                new: *nv,
                change_pct,
                regression: worse_pct > bound_pct || from_zero,
            });
        }
    }
    rows
}

/// The Markdown table.
pub fn markdown(rows: &[Row], bound_pct: f64) -> String {
    let mut s =
        format!("| metric | baseline | new | change | verdict (bound {bound_pct}%) |\n|---|---:|---:|---:|---|\n");
    for r in rows {
        let change = r
            .change_pct
            .map(|c| format!("{c:+.1}%"))
            .unwrap_or_else(|| "n/a".into());
        let verdict = if r.regression { "**REGRESSION**" } else { "" };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.metric,
            fmt(r.base),
            fmt(r.new),
            change,
            verdict
        ));
    }
    let n = rows.iter().filter(|r| r.regression).count();
    if n == 0 {
        s.push_str("\nNo regression beyond the bound.\n");
    } else {
        s.push_str(&format!(
            "\n{n} regression(s) beyond the bound: fix them, or update the baseline if the change is intended.\n"
        ));
    }
    s
}

fn fmt(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn load(p: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

/// The `compare` subcommand.
pub fn run(base: &Path, new: &Path, bound: &str) -> ExitCode {
    let Ok(bound_pct) = bound.trim().trim_end_matches('%').parse::<f64>() else {
        eprintln!("loadgen compare: --max-regression must look like 10%");
        return ExitCode::from(2);
    };
    let (b, n) = match (load(base), load(new)) {
        (Ok(b), Ok(n)) => (b, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("loadgen compare: {e}");
            return ExitCode::from(2);
        }
    };
    if b["scenario"] != n["scenario"] {
        eprintln!(
            "loadgen compare: scenarios differ ({} vs {})",
            b["scenario"], n["scenario"]
        );
        return ExitCode::from(2);
    }
    let rows = compare(&b, &n, bound_pct);
    print!("{}", markdown(&rows, bound_pct));
    if rows.iter().any(|r| r.regression) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_worse_beyond_the_bound_in_the_right_direction() {
        let base = json!({"latency": {"e2e": {"p99_ms": 10.0, "count": 100}}, "rates": {"sent_per_s": 1000.0},
                          "counters": {"missing": 0, "sent": 5}, "memory": {"server_rss_per_conn_bytes": 5000.0}});
        let new = json!({"latency": {"e2e": {"p99_ms": 10.5, "count": 50}}, "rates": {"sent_per_s": 850.0},
                         "counters": {"missing": 1, "sent": 1}, "memory": {"server_rss_per_conn_bytes": 4000.0}});
        let rows = compare(&base, &new, 10.0);
        let get = |m: &str| rows.iter().find(|r| r.metric == m).unwrap().regression;
        assert!(!get("latency.e2e.p99_ms"), "+5% is within 10%");
        assert!(!get("latency.e2e.count"));
        assert!(get("rates.sent_per_s"), "-15% throughput");
        assert!(get("counters.missing"), "any missing message where there was none");
        assert!(!get("counters.sent"));
        assert!(!get("memory.server_rss_per_conn_bytes"), "less memory is better");
        assert!(markdown(&rows, 10.0).contains("**REGRESSION**"));
    }

    #[test]
    fn more_server_cpu_per_message_is_a_regression_and_loadgen_cpu_is_context() {
        let base = json!({"cpu": {"server_cpu_us_per_msg": 100.0, "loadgen_cores": 0.2}});
        let worse = json!({"cpu": {"server_cpu_us_per_msg": 120.0, "loadgen_cores": 0.9}});
        let rows = compare(&base, &worse, 10.0);
        let get = |m: &str| rows.iter().find(|r| r.metric == m).unwrap().regression;
        assert!(get("cpu.server_cpu_us_per_msg"), "+20% CPU per message");
        assert!(!get("cpu.loadgen_cores"));
        let better = json!({"cpu": {"server_cpu_us_per_msg": 50.0}});
        assert!(!compare(&base, &better, 10.0)[0].regression);
    }
}
