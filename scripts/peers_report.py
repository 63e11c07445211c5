#!/usr/bin/env python3
"""The peer comparison's table and charts, from the runs scripts/peers.sh made.

    python3 scripts/peers_report.py results/peers

Reads <dir>/<target>/<scenario>/summary.json (targets: sai-none, sai-only, sai-rigor, mqtt, nats,
xmpp; scenarios: connect, chat, group, and capacity-1, -2, ... whose median counts) and writes <dir>/table.md, <dir>/figures.svg
(one panel per figure) and <dir>/capacity.svg (p99 per capacity step, every target).
"""

import json
import sys
from pathlib import Path

from bench_report import esc, steps_chart

TARGETS = [
    ("sai-none", "SAI-IM, ack none"),
    ("sai-only", "SAI-IM, ack only"),
    ("sai-rigor", "SAI-IM, ack rigor"),
    ("mqtt", "Mosquitto (MQTT QoS 1)"),
    ("nats", "NATS + JetStream"),
    ("xmpp", "ejabberd (XMPP, XEP-0198)"),
]
REFERENCE = "sai-only"
COLOURS = ["#9bb4ee", "#3864d8", "#1d3a8a", "#e67e22", "#27ae60", "#8e44ad"]

# (label, scenario, section, key, field, unit, higher is better)
FIGURES = [
    ("capacity at p99 <= 50 ms (median search)", "capacity", "rates", "capacity_msgs_per_s", None, "msg/s", True),
    ("chat e2e p99 at the same offered rate", "chat", "latency", "e2e", "p99_ms", "ms", False),
    ("server RSS per connection", "connect", "memory", "server_rss_per_conn_bytes", None, "bytes", False),
    ("handshakes per second", "connect", "rates", "connect_per_s", None, "/s", True),
    ("group fan-out e2e p99", "group", "latency", "e2e", "p99_ms", "ms", False),
    ("server CPU per chat message", "chat", "cpu", "server_cpu_us_per_msg", None, "us", False),
]


def load(d):
    """{(target, scenario): summary}; "capacity" is the median of the capacity-N searches, whose
    capacities are kept under (target, "capacity-all") and whose summaries under "capacity-runs"."""
    runs = {}
    for t, _ in TARGETS:
        for s in ("connect", "chat", "group"):
            p = Path(d) / t / s / "summary.json"
            if p.exists():
                runs[(t, s)] = json.loads(p.read_text())
        caps = [json.loads(p.read_text()) for p in sorted((Path(d) / t).glob("capacity-*/summary.json"))]
        if caps:
            caps.sort(key=lambda c: c.get("rates", {}).get("capacity_msgs_per_s", 0))
            runs[(t, "capacity")] = caps[(len(caps) - 1) // 2]
            runs[(t, "capacity-all")] = [c.get("rates", {}).get("capacity_msgs_per_s", 0) for c in caps]
            runs[(t, "capacity-runs")] = caps
    return runs


def value(runs, t, scenario, section, key, field):
    s = runs.get((t, scenario))
    if not s:
        return None
    v = s.get(section, {}).get(key)
    if field is not None:
        v = v.get(field) if isinstance(v, dict) else None
    return v


def fmt(v, unit):
    if v is None:
        return "-"
    if unit in ("ms", "us") and v < 100:
        return f"{v:.1f} {unit}"
    return f"{v:,.0f} {unit}"


def panels(runs):
    """One horizontal bar panel per figure, a bar per target."""
    w, bar, left = 760, 16, 230
    rows = [(f, [(t, name, value(runs, t, *f[1:5])) for t, name in TARGETS]) for f in FIGURES]
    h = 30 + sum(40 + bar * len(v) for _, v in rows)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w/2}" y="18" text-anchor="middle" font-size="14">SAI-IM and its peers on one 2-core machine</text>']
    y = 30
    for (label, _, _, _, _, unit, higher), vals in rows:
        out.append(f'<text x="10" y="{y+16}" font-weight="bold">{esc(label)} ({"higher" if higher else "lower"} is better)</text>')
        y += 24
        top = max((v for _, _, v in vals if v), default=1) or 1
        for i, (t, name, v) in enumerate(vals):
            colour = COLOURS[i % len(COLOURS)]
            out.append(f'<text x="{left-8}" y="{y+12}" text-anchor="end">{esc(name)}</text>')
            width = 0 if v is None else max(v / top * (w - left - 110), 1)
            out.append(f'<rect x="{left}" y="{y+2}" width="{width:.1f}" height="{bar-4}" fill="{colour}"/>')
            out.append(f'<text x="{left+width+6:.1f}" y="{y+12}">{esc(fmt(v, unit))}</text>')
            y += bar
        y += 16
    out.append("</svg>")
    return "\n".join(out)


def correctness(runs, t):
    bad, verdicts = 0, []
    every = [runs.get((t, s)) for s in ("connect", "chat", "group")] + runs.get((t, "capacity-runs"), [])
    for r in every:
        if not r:
            continue
        c = r.get("counters", {})
        bad += sum(c.get(k, 0) for k in ("missing", "duplicated", "out_of_order"))
        verdicts.append(r.get("verdict", "?"))
    return bad, verdicts


def table(runs):
    md = ["| | " + " | ".join(name for _, name in TARGETS) + " |",
          "|---|" + "---|" * len(TARGETS)]
    for label, scenario, section, key, field, unit, _ in FIGURES:
        cells = [fmt(value(runs, t, scenario, section, key, field), unit) for t, _ in TARGETS]
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for t, _ in TARGETS:
        caps = runs.get((t, "capacity-all"))
        cells.append("-" if not caps else " / ".join(f"{c:,.0f}" for c in caps))
    md.append("| capacity, each search (msg/s) | " + " | ".join(cells) + " |")
    for label, scenario, key, field in [("chat e2e p50", "chat", "e2e", "p50_ms"),
                                        ("chat ack p99", "chat", "ack", "p99_ms"),
                                        ("handshake p99", "connect", "handshake", "p99_ms")]:
        cells = [fmt(value(runs, t, scenario, "latency", key, field), "ms") for t, _ in TARGETS]
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for t, _ in TARGETS:
        bad, verdicts = correctness(runs, t)
        cells.append("-" if not verdicts else f"{bad} ({'ok' if all(v == 'ok' for v in verdicts) else 'FAIL'})")
    md.append("| missing + duplicated + out of order, all runs | " + " | ".join(cells) + " |")
    md += ["", f"How many times better {dict(TARGETS)[REFERENCE]} is than each peer (above 1: SAI-IM better):", "",
           "| | " + " | ".join(name for t, name in TARGETS if not t.startswith("sai")) + " |",
           "|---|" + "---|" * sum(1 for t, _ in TARGETS if not t.startswith("sai"))]
    for label, scenario, section, key, field, _, higher in FIGURES:
        ref = value(runs, REFERENCE, scenario, section, key, field)
        cells = []
        for t, _ in TARGETS:
            if t.startswith("sai"):
                continue
            v = value(runs, t, scenario, section, key, field)
            if not ref or not v:
                cells.append("-")
            else:
                cells.append(f"{(ref / v if higher else v / ref):.2f}x")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    d = Path(argv[1])
    runs = load(d)
    if not runs:
        print(f"no runs in {d}", file=sys.stderr)
        return 1
    (d / "table.md").write_text(table(runs))
    (d / "figures.svg").write_text(panels(runs))
    caps = [(name, COLOURS[i], runs.get((t, "capacity"))) for i, (t, name) in enumerate(TARGETS)]
    chart = steps_chart(caps)
    if chart:
        (d / "capacity.svg").write_text(chart)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
