#!/usr/bin/env python3
"""The CI benchmark regression report (run by scripts/bench-report.sh; standard library only).

  bench_report.py calibrate                      one calibration figure, JSON on stdout
  bench_report.py report REFERENCE RUNS OUT      compare RUNS with REFERENCE, write OUT/report.md
                                                 and its charts; exit 1 on a regression

A directory of runs holds `chat-<i>/summary.json` (the same fixed-rate chat run, repeated),
`capacity/summary.json` (one capacity search) and `calibration.json`.

Absolute figures move between machines, so speed figures are compared after scaling by the
calibration ratio (this machine's calibration over the reference's, measured in the same run as
the benchmark): lower-is-better figures are multiplied by it, higher-is-better ones divided.
Each judged figure has a noise band: twice the larger relative spread (max - min over the
median) of its repeated runs, here or in the reference, and never under FLOOR; a scaled figure's
band also adds both calibrations' own noise (how much their before and after measurements
differ). A figure is a
regression only when its median is worse than the reference's by more than the band.
Correctness (missing, duplicated, out-of-order messages, errors) fails the report on any run,
whatever the band.
"""
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

FLOOR = 0.10
# (section, key, field or None, "lower"/"higher", scaled by the calibration, label). Not
# judged: the connect rate (loadgen paces it, so it measures loadgen's setting) and the
# handshake p99 (2,000 connects in one second: its runs differed tenfold here).
JUDGED = [
    ("latency", "e2e", "p50_ms", "lower", True, "e2e latency p50 (ms)"),
    ("latency", "e2e", "p99_ms", "lower", True, "e2e latency p99 (ms)"),
    ("cpu", "server_cpu_us_per_msg", None, "lower", True, "server CPU per message (us)"),
    ("memory", "server_rss_per_conn_bytes", None, "lower", False, "server RSS per connection (bytes)"),
]
CORRECTNESS = ["missing", "duplicated", "out_of_order", "errors"]


def calibrate(reps=5, seconds=0.3):
    """SHA-256 over 64 KiB blocks per second: the best of `reps` short measurements (the best
    is the least disturbed by whatever else runs). A loopback round-trip workload was tried
    beside it and dropped: from Python its rate moved by +-20 % between back-to-back runs here
    (thread hand-offs under the GIL), four times the noise of this one."""
    block = bytes(range(256)) * 256
    best = 0.0
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(16):
                hashlib.sha256(block).digest()
            n += 16
        best = max(best, n / (time.perf_counter() - t0))
    return {"sha256_64k_per_s": best, "score": best}


def load_runs(d):
    d = Path(d)
    chats = [json.loads(p.read_text()) for p in sorted(d.glob("chat-*/summary.json"))]
    cap = d / "capacity" / "summary.json"
    capacity = json.loads(cap.read_text()) if cap.exists() else None
    calib = json.loads((d / "calibration.json").read_text())
    return chats, capacity, calib


def figure(summary, section, key, field):
    v = summary.get(section, {}).get(key)
    if field is not None:
        v = v.get(field) if isinstance(v, dict) else None
    return v


def spread(values):
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else 0.0


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def ratio_chart(rows):
    """Bars of now / reference (after scaling) per figure, with each figure's band shaded."""
    w, row_h, left, right = 760, 34, 270, 40
    h = 50 + row_h * len(rows)
    lo, hi = 0.5, 1.5
    x = lambda r: left + (min(max(r, lo), hi) - lo) / (hi - lo) * (w - left - right)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w/2}" y="18" text-anchor="middle" font-size="14">now / reference (1.0 = unchanged; shaded: noise band; red: regression)</text>']
    for tick in (0.5, 0.75, 1.0, 1.25, 1.5):
        out.append(f'<line x1="{x(tick)}" y1="28" x2="{x(tick)}" y2="{h-10}" stroke="#ccc"/>')
        out.append(f'<text x="{x(tick)}" y="{h-0}" text-anchor="middle" fill="#666">{tick}</text>')
    for i, r in enumerate(rows):
        y = 34 + i * row_h
        out.append(f'<text x="{left-8}" y="{y+16}" text-anchor="end">{esc(r["label"])}</text>')
        out.append(f'<rect x="{x(1-r["band"])}" y="{y+2}" width="{x(1+r["band"])-x(1-r["band"])}" height="{row_h-8}" fill="#e8eefc"/>')
        ratio = r["ratio"]
        colour = "#c0392b" if r["regression"] else "#2e7d32"
        x0, x1 = sorted((x(1.0), x(ratio)))
        out.append(f'<rect x="{x0}" y="{y+8}" width="{max(x1-x0, 1)}" height="{row_h-20}" fill="{colour}"/>')
        out.append(f'<text x="{x(ratio)+4 if ratio >= 1 else x(ratio)-4}" y="{y+18}" text-anchor="{"start" if ratio >= 1 else "end"}">{ratio:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out)


def capacity_chart(ref, now):
    """p99 per capacity step, reference and now."""
    return steps_chart([("reference", "#888", ref), ("now", "#3864d8", now)])


def steps_chart(series):
    """p99 per capacity step of each (name, colour, capacity summary) in `series`."""
    w, h, left, bottom = 760, 320, 60, 40
    pts = [(s["rate"], s["p99_ms"]) for _, _, cap in series if cap for s in cap.get("steps", [])]
    if not pts:
        return None
    xmax = max(p[0] for p in pts) * 1.05
    # Steps far over the limit are drawn at the top edge (up to 4x the limit is shown).
    ymax = min(max(max(p[1] for p in pts), 50), 200) * 1.1
    X = lambda v: left + v / xmax * (w - left - 20)
    Y = lambda v: h - bottom - min(v, ymax) / ymax * (h - bottom - 30)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w/2}" y="18" text-anchor="middle" font-size="14">capacity search: p99 e2e per step (limit dashed)</text>',
           f'<line x1="{left}" y1="{Y(50)}" x2="{w-20}" y2="{Y(50)}" stroke="#c0392b" stroke-dasharray="5,4"/>',
           f'<line x1="{left}" y1="{h-bottom}" x2="{w-20}" y2="{h-bottom}" stroke="#333"/>',
           f'<line x1="{left}" y1="30" x2="{left}" y2="{h-bottom}" stroke="#333"/>',
           f'<text x="{w/2}" y="{h-8}" text-anchor="middle">msg/s</text>',
           f'<text x="14" y="{h/2}" transform="rotate(-90 14 {h/2})" text-anchor="middle">p99 ms</text>']
    for i, (name, colour, cap) in enumerate(series):
        if not cap:
            continue
        steps = cap.get("steps", [])
        path = " ".join(f"{X(s['rate']):.1f},{Y(s['p99_ms']):.1f}" for s in steps)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for s in steps:
            out.append(f'<circle cx="{X(s["rate"]):.1f}" cy="{Y(s["p99_ms"]):.1f}" r="3" fill="{colour}"/>')
        out.append(f'<text x="{w-30}" y="{40+16*i}" text-anchor="end" fill="{colour}">{name}</text>')
    for v in range(0, int(xmax) + 1, max(1000, int(xmax / 8) // 1000 * 1000)):
        out.append(f'<text x="{X(v)}" y="{h-bottom+16}" text-anchor="middle" fill="#666">{v}</text>')
    out.append("</svg>")
    return "\n".join(out)


def report(ref_dir, runs_dir, out_dir):
    ref_chats, ref_cap, ref_cal = load_runs(ref_dir)
    chats, cap, cal = load_runs(runs_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not chats:
        (out / "report.md").write_text("# Benchmark report: FAIL\n\nNo chat run wrote a summary: "
                                       "see the runs' .txt files.\n")
        print("no chat run wrote a summary", file=sys.stderr)
        return 1
    scale = cal["score"] / ref_cal["score"]
    failures = []
    if len(chats) < len(ref_chats) or cap is None:
        failures.append(f"{len(chats)} chat runs of {len(ref_chats)} and {'a' if cap else 'no'} "
                        f"capacity search wrote a summary (see the runs' .txt files)")
    for i, s in enumerate(chats + ([cap] if cap else [])):
        for k in CORRECTNESS:
            if s.get("counters", {}).get(k, 0):
                failures.append(f"run {i}: {k} = {s['counters'][k]}")
    rows = []
    for section, key, field, better, scaled, label in JUDGED:
        ref_v = [v for v in (figure(s, section, key, field) for s in ref_chats) if v is not None]
        now_v = [v for v in (figure(s, section, key, field) for s in chats) if v is not None]
        if not ref_v or not now_v:
            continue
        ref_m, now_m = statistics.median(ref_v), statistics.median(now_v)
        if scaled:
            norm = now_m * scale if better == "lower" else now_m / scale
        else:
            norm = now_m
        band = max(FLOOR, 2 * max(spread(ref_v), spread(now_v)))
        if scaled:
            # The calibration's own noise: how far its before and after measurements differ.
            band += cal.get("uncertainty", 0.0) + ref_cal.get("uncertainty", 0.0)
        ratio = norm / ref_m if ref_m else 1.0
        worse = ratio - 1 if better == "lower" else 1 - ratio
        rows.append({"label": label, "ref": ref_m, "now": now_m, "norm": norm, "ratio": ratio,
                     "band": band, "regression": worse > band, "better": better,
                     "runs": now_v, "ref_runs": ref_v})
    regressions = [r for r in rows if r["regression"]]
    cap_now = cap["rates"].get("capacity_msgs_per_s") if cap else None
    cap_ref = ref_cap["rates"].get("capacity_msgs_per_s") if ref_cap else None

    (out / "ratios.svg").write_text(ratio_chart(rows) + "\n")
    cap_svg = capacity_chart(ref_cap, cap)
    if cap_svg:
        (out / "capacity.svg").write_text(cap_svg + "\n")
    verdict = "FAIL" if failures or regressions else "ok"
    md = [f"# Benchmark report: {verdict}", ""]
    md.append(f"Reference: `{ref_dir}` (git {ref_chats[0].get('git_rev', '?')[:12]}); "
              f"now: git {chats[0].get('git_rev', '?')[:12]}, {len(chats)} runs of the same "
              f"chat scenario ({chats[0]['params'].get('users')} users, "
              f"{chats[0]['params'].get('rate')} msg/s, ack mode {chats[0]['params'].get('ack_mode')}).")
    md.append("")
    md.append(f"**Calibration** (measured in this run, beside the benchmark): score {cal['score']:.0f} "
              f"here, {ref_cal['score']:.0f} for the reference: this machine is **{scale:.2f}x** the "
              f"reference's speed (SHA-256 over 64 KiB, {cal['sha256_64k_per_s']:.0f}/s; before and "
              f"after the benchmark they differed by {cal.get('uncertainty', 0) * 100:.1f} %, "
              f"{ref_cal.get('uncertainty', 0) * 100:.1f} % in the reference, which widens the "
              f"bands of the scaled figures). Speed figures are scaled by it; memory is not.")
    md.append("")
    md.append("**Correctness**: " + ("every run: 0 missing, duplicated, out of order, errors."
                                     if not failures else "FAILED: " + "; ".join(failures)))
    md.append("")
    md.append("| figure | reference (median) | now (median, raw) | now (scaled) | change | noise band | verdict |")
    md.append("|---|---|---|---|---|---|---|")
    for r in rows:
        change = (r["ratio"] - 1) * 100
        md.append(f"| {r['label']} ({r['better']} is better) | {r['ref']:.3f} | {r['now']:.3f} | "
                  f"{r['norm']:.3f} | {change:+.1f} % | ±{r['band']*100:.0f} % | "
                  f"{'**regression**' if r['regression'] else 'ok'} |")
    md.append("")
    md.append("![now / reference](ratios.svg)")
    md.append("")
    if cap_now is not None:
        md.append(f"**Capacity** at p99 <= 50 ms (one search, so not judged: its step is the "
                  f"resolution): {cap_now:.0f} msg/s now, {cap_ref or 0:.0f} msg/s in the reference "
                  f"({cap_now / scale:.0f} msg/s scaled).")
        md.append("")
        if cap_svg:
            md.append("![capacity](capacity.svg)")
            md.append("")
    md.append("Each run's figures: " + "; ".join(
        f"{r['label']}: now {', '.join(f'{v:.3f}' for v in r['runs'])} / reference "
        f"{', '.join(f'{v:.3f}' for v in r['ref_runs'])}" for r in rows) + ".")
    md.append("")
    md.append(f"Band: twice the larger relative spread of the repeated runs (here or in the "
              f"reference), at least {FLOOR*100:.0f} %, plus the calibrations' noise for scaled "
              f"figures. A regression is a scaled median worse "
              f"than the reference's by more than its band; correctness fails on any run.")
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if failures or regressions else 0


def main(argv):
    if len(argv) >= 2 and argv[1] == "calibrate":
        print(json.dumps(calibrate()))
        return 0
    if len(argv) == 5 and argv[1] == "report":
        return report(argv[2], argv[3], argv[4])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
