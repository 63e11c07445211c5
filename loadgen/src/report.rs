//! Results: HDR histograms, counters and the per-second series; the JSON summary, CSV, SVG
//! charts and the terminal table. Worker processes write [`WorkerOut`] (histograms serialized in
//! HdrHistogram's V2 format, so merging is exact); the coordinator merges them into a [`Report`].

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Version of the JSON summary layout (`results/README.md` documents it).
pub const SCHEMA: u32 = 1;

/// A latency histogram in microseconds, 1 us to 10 min, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Records `us`, clamping into the histogram's range.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    let _ = h.record(us.clamp(1, 600_000_000));
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th.
    pub p99_ms: f64,
    /// 99.9th.
    pub p999_ms: f64,
    /// 99.99th.
    pub p9999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Summary {
    /// Summarizes a microsecond histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        if h.is_empty() {
            return Self {
                count: 0,
                mean_ms: 0.0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                p999_ms: 0.0,
                p9999_ms: 0.0,
                max_ms: 0.0,
            };
        }
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            p9999_ms: ms(h.value_at_quantile(0.9999)),
            max_ms: ms(h.max()),
        }
    }
}

/// One second of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the start.
    pub t: u32,
    /// Open connections at the end of the second.
    pub connections: u64,
    /// Messages sent in the second.
    pub sent: u64,
    /// Acks received in the second.
    pub acked: u64,
    /// Pushes received in the second.
    pub delivered: u64,
    /// Errors in the second.
    pub errors: u64,
    /// Median of the second's main latency (ms).
    pub p50_ms: f64,
    /// 99th percentile of the second's main latency (ms).
    pub p99_ms: f64,
    /// Gateway RSS (KiB), when `--server-pid` is given.
    pub server_rss_kib: u64,
    /// This load generator's RSS (KiB).
    pub loadgen_rss_kib: u64,
    /// The second's latency histogram ([`encode_hist`]), so that a `--procs` run merges the
    /// workers' seconds exactly instead of taking the worst worker's percentiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hist: Option<String>,
}

/// A histogram as text: V2-serialized, base64 (what [`WorkerOut`] and the `--procs` step
/// reports carry between processes).
pub fn encode_hist(h: &Histogram<u64>) -> Option<String> {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(buf))
}

/// [`encode_hist`] read back.
pub fn decode_hist(text: &str) -> Option<Histogram<u64>> {
    let raw = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    Deserializer::new().deserialize(&mut raw.as_slice()).ok()
}

/// What one worker process reports.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerOut {
    /// Histograms, V2-serialized, base64.
    pub hists: BTreeMap<String, String>,
    /// Counters.
    pub counters: BTreeMap<String, u64>,
    /// Failures by cause.
    pub failures: BTreeMap<String, u64>,
    /// Per-second series.
    pub series: Vec<Second>,
    /// Measured durations and sizes.
    pub extra: BTreeMap<String, f64>,
    /// Per-step results (capacity).
    pub steps: Vec<Value>,
}

impl WorkerOut {
    /// Stores a histogram.
    pub fn put_hist(&mut self, name: &str, h: &Histogram<u64>) {
        if let Some(text) = encode_hist(h) {
            self.hists.insert(name.to_string(), text);
        }
    }

    /// Reads a histogram back.
    pub fn hist(&self, name: &str) -> Option<Histogram<u64>> {
        decode_hist(self.hists.get(name)?)
    }

    /// Merges another worker's output: histograms exactly, counters summed, the series summed
    /// per second (per-second percentiles take the worse of the two workers).
    pub fn merge(&mut self, other: WorkerOut) {
        for name in other.hists.keys() {
            let mut mine = self.hist(name).unwrap_or_else(new_hist);
            if let Some(h) = other.hist(name) {
                let _ = mine.add(&h);
            }
            self.put_hist(name, &mine);
        }
        for (k, v) in other.counters {
            *self.counters.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.failures {
            *self.failures.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.extra {
            let e = self.extra.entry(k.clone()).or_insert(0.0);
            // Durations merge as the slowest worker; sizes and counts add up.
            *e = if k.ends_with("_s") || k.ends_with("_ms") {
                e.max(v)
            } else {
                *e + v
            };
        }
        for s in other.series {
            let i = s.t as usize;
            if self.series.len() <= i {
                self.series.resize_with(i + 1, Second::default);
                for (j, x) in self.series.iter_mut().enumerate() {
                    x.t = j as u32;
                }
            }
            let m = &mut self.series[i];
            m.connections += s.connections;
            m.sent += s.sent;
            m.acked += s.acked;
            m.delivered += s.delivered;
            m.errors += s.errors;
            match s.hist.as_deref().and_then(decode_hist) {
                // The second's latencies of all workers together.
                Some(theirs) => {
                    let mut all = m.hist.as_deref().and_then(decode_hist).unwrap_or_else(new_hist);
                    let _ = all.add(&theirs);
                    let sum = Summary::of(&all);
                    (m.p50_ms, m.p99_ms) = (sum.p50_ms, sum.p99_ms);
                    m.hist = encode_hist(&all);
                }
                // A worker without the histogram: the worst worker's percentiles.
                None => {
                    m.p50_ms = m.p50_ms.max(s.p50_ms);
                    m.p99_ms = m.p99_ms.max(s.p99_ms);
                }
            }
            m.server_rss_kib = m.server_rss_kib.max(s.server_rss_kib);
            m.loadgen_rss_kib += s.loadgen_rss_kib;
        }
        self.steps.extend(other.steps);
    }
}

/// The machine a run was made on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Logical cores.
    pub cores: usize,
    /// Total memory (KiB).
    pub mem_kib: u64,
    /// `uname -r`.
    pub kernel: String,
    /// Free text, e.g. "2-core dev VM".
    pub note: String,
}

/// The JSON summary of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: u32,
    /// Scenario name.
    pub scenario: String,
    /// Parameters as given.
    pub params: Value,
    /// `git rev-parse HEAD` of the checkout, when known.
    pub git_rev: String,
    /// Where it ran.
    pub machine: Machine,
    /// Unix seconds at the start.
    pub started_at: u64,
    /// Wall time of the measured phase.
    pub duration_s: f64,
    /// Latency percentiles by name (`handshake`, `ack`, `e2e`, `reconnect`).
    pub latency: BTreeMap<String, Summary>,
    /// Rates per second by name.
    pub rates: BTreeMap<String, f64>,
    /// Counters: sent, acked, delivered, missing, duplicated, out_of_order, errors, ...
    pub counters: BTreeMap<String, u64>,
    /// Failures by cause.
    pub failures: BTreeMap<String, u64>,
    /// Memory figures (bytes or KiB, as named).
    pub memory: BTreeMap<String, f64>,
    /// CPU over the traffic phase: `server_cpu_s`, `server_cpu_us_per_msg` (server CPU time per
    /// message sent), `loadgen_cpu_s`, `loadgen_cores` (cores the load generator kept busy).
    #[serde(default)]
    pub cpu: BTreeMap<String, f64>,
    /// Per-step results (capacity).
    #[serde(default)]
    pub steps: Vec<Value>,
    /// "ok", or what went wrong.
    pub verdict: String,
}

impl Report {
    /// Whether the correctness counters are clean.
    pub fn correct(&self) -> bool {
        ["missing", "duplicated", "out_of_order", "unacked"]
            .iter()
            .all(|k| self.counters.get(*k).copied().unwrap_or(0) == 0)
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "\n== {} ({:.1} s) ==", self.scenario, self.duration_s);
        let _ = writeln!(
            s,
            "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency ms", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max", "mean"
        );
        for (name, l) in &self.latency {
            let _ = writeln!(
                s,
                "{:<20} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                name, l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.p9999_ms, l.max_ms, l.mean_ms
            );
        }
        for (k, v) in &self.rates {
            let _ = writeln!(s, "rate   {k:<28} {v:>14.1}/s");
        }
        for (k, v) in &self.counters {
            let _ = writeln!(s, "count  {k:<28} {v:>14}");
        }
        for (k, v) in &self.failures {
            let _ = writeln!(s, "fail   {k:<28} {v:>14}");
        }
        for (k, v) in &self.memory {
            let _ = writeln!(s, "memory {k:<28} {v:>14.0}");
        }
        for (k, v) in &self.cpu {
            let _ = writeln!(s, "cpu    {k:<28} {v:>14.2}");
        }
        let _ = writeln!(s, "verdict: {}", self.verdict);
        s
    }

    /// Writes `summary.json`, `series.csv` and the SVG charts into `dir`.
    pub fn write(&self, dir: &Path, series: &[Second]) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("summary.json"), json + "\n")?;
        let mut csv =
            String::from("t,connections,sent,acked,delivered,errors,p50_ms,p99_ms,server_rss_kib,loadgen_rss_kib\n");
        for x in series {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{:.3},{:.3},{},{}",
                x.t,
                x.connections,
                x.sent,
                x.acked,
                x.delivered,
                x.errors,
                x.p50_ms,
                x.p99_ms,
                x.server_rss_kib,
                x.loadgen_rss_kib
            );
        }
        std::fs::write(dir.join("series.csv"), csv)?;
        let lat: Vec<(&str, Vec<f64>)> = vec![
            ("p50 ms", series.iter().map(|x| x.p50_ms).collect()),
            ("p99 ms", series.iter().map(|x| x.p99_ms).collect()),
        ];
        std::fs::write(
            dir.join("latency.svg"),
            svg_chart(
                &format!("{}: latency percentiles per second", self.scenario),
                "ms",
                &lat,
            ),
        )?;
        let conns: Vec<(&str, Vec<f64>)> = vec![("connections", series.iter().map(|x| x.connections as f64).collect())];
        std::fs::write(
            dir.join("connections.svg"),
            svg_chart(&format!("{}: open connections", self.scenario), "connections", &conns),
        )?;
        let rss: Vec<(&str, Vec<f64>)> = vec![
            (
                "gateway RSS MiB",
                series.iter().map(|x| x.server_rss_kib as f64 / 1024.0).collect(),
            ),
            (
                "loadgen RSS MiB",
                series.iter().map(|x| x.loadgen_rss_kib as f64 / 1024.0).collect(),
            ),
        ];
        std::fs::write(
            dir.join("rss.svg"),
            svg_chart(&format!("{}: resident memory", self.scenario), "MiB", &rss),
        )?;
        Ok(())
    }
}

/// A line chart, one polyline per series, x = seconds.
pub fn svg_chart(title: &str, unit: &str, lines: &[(&str, Vec<f64>)]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 300.0;
    const L: f64 = 70.0;
    const B: f64 = 40.0;
    const T: f64 = 40.0;
    const R: f64 = 150.0;
    let n = lines.iter().map(|l| l.1.len()).max().unwrap_or(0).max(2);
    let ymax = lines
        .iter()
        .flat_map(|l| l.1.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let x = |i: usize| L + (W - L - R) * i as f64 / (n - 1) as f64;
    let y = |v: f64| T + (H - T - B) * (1.0 - v / ymax);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{L}\" y=\"22\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    for k in 0..=4 {
        let v = ymax * k as f64 / 4.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{L}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - R,
            L - 6.0,
            yy + 4.0,
            short(v)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds (0..{})</text><text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">{}</text>",
        (L + W - R) / 2.0,
        H - 8.0,
        n - 1,
        H / 2.0,
        H / 2.0,
        escape(unit)
    );
    for (i, (name, vals)) in lines.iter().enumerate() {
        let c = colors[i % colors.len()];
        let pts: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(j, v)| format!("{:.1},{:.1}", x(j), y(*v)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{}</text>",
            pts.join(" "),
            W - R + 10.0,
            T + 16.0 * (i as f64 + 1.0),
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_workers_is_exact() {
        let (mut a, mut b) = (new_hist(), new_hist());
        let mut all = new_hist();
        for i in 1..=1000u64 {
            record(if i % 3 == 0 { &mut a } else { &mut b }, i * 7);
            record(&mut all, i * 7);
        }
        let mut wa = WorkerOut::default();
        wa.put_hist("e2e", &a);
        wa.counters.insert("sent".into(), 5);
        let mut wb = WorkerOut::default();
        wb.put_hist("e2e", &b);
        wb.counters.insert("sent".into(), 6);
        wa.merge(wb);
        assert_eq!(Summary::of(&wa.hist("e2e").unwrap()), Summary::of(&all));
        assert_eq!(wa.counters["sent"], 11);
    }

    #[test]
    fn workers_seconds_merge_their_histograms_not_their_worst_percentile() {
        // Worker a: 99 fast samples; worker b: one slow one. Alone, b's p99 is the slow one;
        // together the second's p99 is fast (1 of 100 samples is above it).
        let (mut a, mut b) = (new_hist(), new_hist());
        for _ in 0..99 {
            record(&mut a, 1_000);
        }
        record(&mut b, 900_000);
        let second = |h: &Histogram<u64>| {
            let sum = Summary::of(h);
            Second {
                t: 3,
                sent: h.len(),
                p50_ms: sum.p50_ms,
                p99_ms: sum.p99_ms,
                hist: encode_hist(h),
                ..Second::default()
            }
        };
        let mut merged = WorkerOut::default();
        for h in [&a, &b] {
            merged.merge(WorkerOut {
                series: vec![second(h)],
                ..WorkerOut::default()
            });
        }
        let s = &merged.series[3];
        assert_eq!((s.t, s.sent), (3, 100));
        assert!((s.p99_ms - 1.0).abs() < 0.01, "p99 {} ms", s.p99_ms);
        assert!(Summary::of(&b).p99_ms > 899.0, "the slow worker alone");
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let s = svg_chart("t<1>", "ms", &[("a", vec![1.0, 2.0, 3.0])]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("t&lt;1&gt;"));
    }
}
