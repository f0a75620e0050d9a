#!/usr/bin/env python3
"""Prints the runs of a bench/recipe_search.sh log as one Markdown table per task.

Usage: bench/results_table.py LOG.jsonl [--baseline full]

Columns: method, metric value, trainable parameters, saved bytes, training seconds, peak RSS,
and, when the task has a run of the baseline method, the metric difference and the time and
memory ratios against it. Where every run of a task has result.json's eval_seconds (the
evaluations inside train_seconds), an "eval s" column follows and the time ratio compares the
training without them. Failed runs are listed with their exit status.
"""

import argparse
import json
from collections import OrderedDict


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log")
    parser.add_argument("--baseline", default="full")
    args = parser.parse_args()
    tasks = OrderedDict()
    with open(args.log, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                run = json.loads(line)
                task = run.get("task") or run["options"].split("--task ")[1].split()[0]
                tasks.setdefault(task, []).append(run)
    for task, runs in tasks.items():
        base = next((r for r in runs if r.get("method") == args.baseline and "value" in r), None)
        metric = next((r["metric"] for r in runs if "metric" in r), "metric")
        print(f"\n**{task}**\n")
        evals = all("eval_seconds" in r for r in runs if "value" in r)
        head = f"| run | method | {metric} | trainable | saved bytes | train s |"
        head += " eval s | peak RSS MiB |" if evals else " peak RSS MiB |"
        if base:
            head += f" vs {args.baseline}: points / {'time without eval' if evals else 'time'} / memory |"

        def seconds(r):
            return r["train_seconds"] - (r["eval_seconds"] if evals else 0)
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for r in runs:
            if "value" not in r:
                print(f"| {r['run']} | {r['options']} | failed (exit {r.get('exit_status')}) |")
                continue
            row = (f"| {r['run']} | {r['method']} | {r['value']:.4f} | {r['trainable_params']:,} | "
                   f"{r['adapter_bytes']:,} | {r['train_seconds']:.0f} |")
            if evals:
                row += f" {r['eval_seconds']:.0f} |"
            row += f" {r['peak_rss_mb']:.0f} |"
            if base:
                row += (f" {100 * (r['value'] - base['value']):+.2f} / "
                        f"{seconds(r) / seconds(base):.2f}x / "
                        f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |")
            print(row)


if __name__ == "__main__":
    main()
