#!/usr/bin/env python3
"""Plots bench/vs_hf.sh's JSON lines: step time and peak memory, peft (C++) against Hugging Face
PEFT (Python), per method and configuration.

  plot.py results.jsonl [more.jsonl ...] --out docs/bench_vs_hf.png

Several lines for one method and configuration (repeated runs) are drawn as their median, with
the smallest and largest as an error bar.
"""

import argparse
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths):
    rows = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                r = json.loads(line)
                key = (r["method"], r["batch"], r["seq"])
                rows.setdefault(key, []).append(r)
    return rows


def summary(values):
    return statistics.median(values), min(values), max(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = load(args.files)
    order = {"lora": 0, "prefix": 1, "prompt": 2, "infer-lora-merged": 3}
    keys = sorted(rows, key=lambda k: (order.get(k[0], 9), k[1], k[2]))
    short = {"infer-lora-merged": "merged\ninfer"}
    labels = [f"{short.get(m, m)}\n{b}x{s}" for m, b, s in keys]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(keys)), 8), constrained_layout=True)
    width = 0.4
    for ax, (cpp_key, hf_key, title) in zip(axes, [
            ("cpp_step_ms", "hf_step_ms", "step time, ms (median; bar = min..max over repeats)"),
            ("cpp_peak_mb", "hf_peak_mb", "peak RSS of the process, MiB")]):
        for offset, key, name, color in [(-width / 2, cpp_key, "peft (C++)", "#1f77b4"),
                                         (width / 2, hf_key, "HF PEFT (Python)", "#ff7f0e")]:
            stats = [summary([r[key] for r in rows[k]]) for k in keys]
            xs = [i + offset for i in range(len(keys))]
            mids = [s[0] for s in stats]
            errs = [[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]]
            ax.bar(xs, mids, width, yerr=errs, capsize=2, label=name, color=color)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
        ax.legend()
        if "step" in title:
            ax.set_yscale("log")
    fig.suptitle("all-MiniLM-L6-v2, 2 threads, batch x sequence")
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
