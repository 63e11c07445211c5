#!/usr/bin/env python3
"""Turns the criterion output of `cargo bench -p sai-bitmap --bench vs_roaring` into the
Markdown tables of results/bitmap/table.md: per dataset and operation, sai-bitmap's and
roaring's median times and the speed-up (roaring / sai), then the slowest speed-up per
operation for groups up to 2,000 members and for 50,000.

    python3 scripts/bitmap_table.py results/bitmap/criterion.txt > results/bitmap/table.md
"""
import re
import sys

UNIT_NS = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}


def parse(text):
    """{(op, impl, dataset): median ns}, from criterion's `name  time: [lo mid hi]` lines."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^(\w+)/(sai|roaring)/(\S+)", line)
        if m:
            name = m.groups()
        m = re.search(r"time:\s+\[\S+ \S+ ([\d.]+) (\S+) \S+ \S+\]", line)
        if m and name:
            out[name] = float(m.group(1)) * UNIT_NS[m.group(2)]
            name = None
    return out


def fmt(ns):
    return f"{ns:.1f}" if ns < 1000 else f"{ns / 1000:.2f} µs"


def main():
    times = parse(open(sys.argv[1], encoding="utf-8").read())
    ops = list(dict.fromkeys(op for op, _, _ in times))
    datasets = list(dict.fromkeys(d for _, _, d in times))
    worst = {op: [None, None] for op in ops}
    print("Times in ns unless marked (criterion's estimate; sai-bitmap / roaring) and speed-up (roaring / sai),")
    print("from `criterion.txt`; regenerate with `python3 scripts/bitmap_table.py`.\n")
    for group in (ops[:4], ops[4:]):
        print("| dataset | " + " | ".join(group) + " |")
        print("|---|" + "---:|" * len(group))
        for d in datasets:
            cells = []
            for op in group:
                a, b = times.get((op, "sai", d)), times.get((op, "roaring", d))
                if a is None or b is None:
                    cells.append("-")
                    continue
                r = b / a
                big = int(d.split("-")[0]) > 2000
                w = worst[op][big]
                worst[op][big] = r if w is None else min(w, r)
                cells.append(f"{fmt(a)} / {fmt(b)} (**{r:.1f}x**)")
            print(f"| {d} | " + " | ".join(cells) + " |")
        print()
    print("Slowest speed-up per operation (above 1.0x: sai-bitmap is faster on every dataset):\n")
    print("| op | groups <= 2,000 | 50,000 |")
    print("|---|---:|---:|")
    for op in ops:
        small, big = worst[op]
        print(f"| {op} | {small:.2f}x | {big:.2f}x |")


if __name__ == "__main__":
    main()
