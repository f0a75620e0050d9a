#!/usr/bin/env python3
"""The Markdown table of bench/vs_hf.sh's JSON lines: per method and configuration, the median
step time of each side with its spread (min-max over the repeats), the ratio of the medians,
the peak-memory ratio, the load average during the runs and the largest first-loss difference.

    bench/vs_hf_table.py vs_hf.jsonl [more.jsonl ...]
"""

import argparse
import json
import statistics
from collections import OrderedDict


def spread(values, fmt="{:.0f}"):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", nargs="+")
    args = parser.parse_args()
    groups = OrderedDict()
    for path in args.logs:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    key = (r["method"], f'{r["batch"]}x{r["seq"]}', r.get("device", "cpu"),
                           r.get("precision", "fp32"))
                    groups.setdefault(key, []).append(r)
    print("| method | batch×seq | device, precision | repeats | C++ ms, median (min-max) | "
          "Python ms, median (min-max) | time C++/Py (of medians; per-repeat range) | "
          "peak memory C++/Py | load average | first-loss diff ≤ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (method, config, device, precision), runs in groups.items():
        cpp = [r["cpp_step_ms"] for r in runs]
        hf = [r["hf_step_ms"] for r in runs]
        per = [r["ratio_time"] for r in runs]
        mem = [r["ratio_mem"] for r in runs]
        loads = [r["load1"] for r in runs if "load1" in r]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
        print(f"| {method} | {config} | {device}, {precision} | {len(runs)} | {spread(cpp)} | "
              f"{spread(hf)} | **{statistics.median(cpp) / statistics.median(hf):.3f}** "
              f"({min(per):.3f}-{max(per):.3f}) | {min(mem):.2f}-{max(mem):.2f} | {load} | "
              f"{max(r['loss_diff'] for r in runs):.1e} |")


if __name__ == "__main__":
    main()
