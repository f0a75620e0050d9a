#!/usr/bin/env python3
"""Prints the early-exit curves of a bench/recipe_search.sh log as Markdown tables.

Usage: bench/early_exit_table.py LOG.jsonl

One table per run that has an "early_exit" object (peft-glue/peft-clue --early-exit): the full
model's metric and time, then each threshold's metric, difference in points, mean layers run,
time and speed-up, as the program measured them in that one process. The threshold the run kept
is marked. Runs without early exit and failed runs are skipped.
"""

import argparse
import json


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log")
    args = parser.parse_args()
    with open(args.log, encoding="utf-8") as f:
        runs = [json.loads(line) for line in f if line.strip()]
    for r in runs:
        e = r.get("early_exit")
        if not e:
            continue
        metric = r["metric"].split(".")[-1]
        full = e[f"full_{metric}"]
        print(f"\n**run {r['run']}**: `{r['options']}`\n")
        print(f"| threshold | {metric} | points vs full | mean layers | seconds | speed-up |")
        print("|---|---|---|---|---|---|")
        print(f"| full model | {full:.4f} | — | all | {e['full_seconds']:.2f} | 1.00× |")
        for p in e["curve"]:
            kept = " (kept)" if p["threshold"] == e["threshold"] else ""
            value = p[metric]
            print(
                f"| {e['policy']} {p['threshold']:g}{kept} | {value:.4f} | "
                f"{100 * (value - full):+.2f} | {p['mean_layers']:.2f} | {p['seconds']:.2f} | "
                f"{p['speedup']:.2f}× |"
            )


if __name__ == "__main__":
    main()
