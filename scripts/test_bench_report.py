#!/usr/bin/env python3
"""The regression report's verdicts on made-up runs (run by scripts/test.sh): unchanged figures
pass, a figure worse beyond its band fails, one inside it passes, a slower machine's figures are
scaled back, and a correctness failure fails whatever the speed."""
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_report  # noqa: E402


def runs(root, name, cpu, p99=10.0, missing=0, score=1000.0):
    d = Path(root) / name
    for i, c in enumerate(cpu, 1):
        (d / f"chat-{i}").mkdir(parents=True)
        summary = {"params": {"users": 10, "rate": 100, "ack_mode": "only"}, "git_rev": "x",
                   "latency": {"e2e": {"p50_ms": 1.0, "p99_ms": p99}},
                   "cpu": {"server_cpu_us_per_msg": c},
                   "memory": {"server_rss_per_conn_bytes": 3000.0},
                   "counters": {"missing": missing if i == 1 else 0}}
        (d / f"chat-{i}" / "summary.json").write_text(json.dumps(summary))
    (d / "capacity").mkdir()
    (d / "capacity" / "summary.json").write_text(json.dumps(
        {"rates": {"capacity_msgs_per_s": 1000.0}, "counters": {},
         "steps": [{"rate": 1000.0, "p99_ms": 5.0}]}))
    (d / "calibration.json").write_text(json.dumps({"score": score, "sha256_64k_per_s": score,
                                                    "uncertainty": 0.0}))
    return str(d)


def verdict(ref, now, out):
    with contextlib.redirect_stdout(io.StringIO()):
        return bench_report.report(ref, now, out)


with tempfile.TemporaryDirectory() as t:
    ref = runs(t, "ref", [100, 101, 99])
    assert verdict(ref, runs(t, "same", [100, 100, 102]), f"{t}/o1") == 0, "unchanged passes"
    assert verdict(ref, runs(t, "worse", [130, 131, 129]), f"{t}/o2") == 1, "30 % worse fails"
    assert "**regression**" in Path(f"{t}/o2/report.md").read_text()
    assert verdict(ref, runs(t, "inside", [106, 107, 105]), f"{t}/o3") == 0, "6 % is inside 10 %"
    # Noisy runs widen the band: 30 % worse, but the runs spread over 40 %.
    assert verdict(ref, runs(t, "noisy", [110, 130, 150]), f"{t}/o4") == 0, "inside a wide band"
    # A machine half as fast takes twice the CPU per message: scaled back, unchanged.
    assert verdict(ref, runs(t, "slow", [200, 201, 199], score=500.0), f"{t}/o5") == 0
    assert verdict(ref, runs(t, "lost", [100, 100, 100], missing=1), f"{t}/o6") == 1, "a loss fails"
    assert "missing = 1" in Path(f"{t}/o6/report.md").read_text()
print("bench_report: verdicts ok")
