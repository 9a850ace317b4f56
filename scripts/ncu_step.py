#!/usr/bin/env python3
"""Summarise one decode step from an Nsight Compute CSV of a whole `braid bench` run.

The CSV comes from
    ncu --csv --page raw --metrics gpu__time_duration.sum --print-units base ... ./bin/braid bench ...
Every decode step ends with its sampling kernel (`argmax_*` or `sample_*`), so the kernels between
two of those are one step. The script picks the last complete step (or the first with `--first`),
among those containing a kernel whose name has `--containing` in it when that is given, and prints its kernels grouped by name: launches, total
time and share of the step, plus the step's kernel count and summed kernel time. ncu runs kernels
one at a time, so the sum excludes launch gaps; compare it with the step time `braid bench`
measures without the profiler to see what the gaps cost.
"""

import argparse
import csv
import json
import sys
from collections import OrderedDict


def read_kernels(path):
    """(name, duration in ns) of every profiled kernel, in launch order."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.reader(lines))
    header = rows[0]
    name_col = header.index("Kernel Name")
    time_col = header.index("gpu__time_duration.sum")
    kernels = []
    for row in rows[1:]:
        try:
            kernels.append((row[name_col], float(row[time_col].replace(",", ""))))
        except (ValueError, IndexError):
            continue  # the units row, or a kernel ncu could not measure
    return kernels


def steps(kernels, markers):
    """Split the launch sequence after every sampling kernel; drop the unfinished tail."""
    out, current = [], []
    for k in kernels:
        current.append(k)
        if k[0].startswith(markers):
            out.append(current)
            current = []
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--containing", help="only steps with a kernel whose name contains this")
    ap.add_argument("--first", action="store_true", help="pick the first such step, not the last")
    ap.add_argument("--title", default="decode step")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args()

    all_steps = steps(read_kernels(args.csv), ("argmax", "sample_"))
    if args.containing:
        all_steps = [s for s in all_steps if any(args.containing in name for name, _ in s)]
    if not all_steps:
        sys.exit(f"{args.csv}: no complete step found")
    step = all_steps[0] if args.first else all_steps[-1]
    total = sum(t for _, t in step)
    groups = OrderedDict()
    for name, t in step:
        short = name.split("(")[0]
        count, time = groups.get(short, (0, 0.0))
        groups[short] = (count + 1, time + t)

    print(f"### {args.title}: {len(step)} kernels, {total / 1e3:.1f} µs of kernel time")
    print()
    print("| kernel | launches | µs | share |")
    print("|---|---:|---:|---:|")
    for short, (count, time) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"| `{short}` | {count} | {time / 1e3:.1f} | {100 * time / total:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "title": args.title,
                    "kernels": len(step),
                    "kernel_time_us": total / 1e3,
                    "by_kernel": {k: {"launches": c, "us": t / 1e3} for k, (c, t) in groups.items()},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
