#!/usr/bin/env python3
"""End to end, as a user runs it: peft-glue against transformers' Trainer + PEFT on SST-2.

    bench/e2e_vs_hf.py --data-dir ../shared/data/glue [--repeats 5] [--rows 2000]
        [--sides peft,peft-ungrouped,python,python-grouped] [--out out/e2e_vs_hf.jsonl]
        [--peft-glue build/pip/examples/peft-glue]

Each run is a whole process timed from start to exit (imports, model loading, tokenisation,
training and evaluation on all 872 rows of dev.tsv): peft-glue, peft-glue with
--no-group-by-length (the batching it had before length grouping), bench/hf_glue_train.py (a
Trainer script as a Python user writes it) and, when asked for (--sides), the same script with
the Trainer's length-grouped sampler (python-grouped), all with the same settings: LoRA r 8 / alpha 16
on query and value, [CLS] pooling through BERT's pooler, the first --rows rows of train.tsv,
one epoch, batch 32, at most 64 tokens, lr 2e-3 for everything, weight decay 0.01, 6 % warm-up,
clipping at 1, the model's own dropout (0.1). Repeat r trains with seed --seed + r on every
side, so the accuracies spread as seeds make them. The sides alternate within every repeat and the order
rotates between repeats, so drift in the machine's speed spreads evenly; the one-minute load
average before each run is recorded. Prints per side the median wall time, its spread (min-max),
the median accuracy and peak RSS, and each side's median time over Python's; appends every run
as a JSON line to --out.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ("peft", "peft-ungrouped", "python", "python-grouped")


def peft_command(opts, grouped, seed):
    cmd = [opts.peft_glue, "--task", "sst2", "--data-dir", opts.data_dir, "--eval-split", "dev",
           "--max-train-samples", str(opts.rows), "--method", "lora", "--pooling", "cls",
           "--epochs", "1", "--batch-size", "32", "--max-len", "64", "--lr", "2e-3",
           "--head-lr", "2e-3", "--model-dropout", "0.1", "--lora-r", "8", "--lora-alpha", "16",
           "--lora-targets", "query,value", "--lora-plus-ratio", "0", "--seed", str(seed)]
    return cmd if grouped else cmd + ["--no-group-by-length"]


def python_command(opts, grouped, seed):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "hf_glue_train.py"), "--data-dir",
           opts.data_dir, "--rows", str(opts.rows), "--seed", str(seed)]
    return cmd + ["--group-by-length"] if grouped else cmd


def run(cmd):
    """Wall seconds, peak RSS (MiB) and stdout of one process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:2])} failed ({proc.returncode}):\n{err.read()[-2000:]}")
        return seconds, usage.ru_maxrss / 1024.0, out.read()


def accuracy_of(side, out, opts):
    if side.startswith("python"):
        line = json.loads(out.strip().splitlines()[-1])
        if line["train_rows"] != opts.rows:
            sys.exit(f"the Python side read {line['train_rows']} rows, not {opts.rows}")
        return line["accuracy"]
    result = json.loads(out.strip().splitlines()[-1])
    rows = re.search(r"train (\d+) examples", out)
    if not rows or int(rows.group(1)) != opts.rows:
        sys.exit(f"peft-glue trained on {rows.group(1) if rows else '?'} rows, not {opts.rows}")
    return result["value"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding SST-2/")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=42,
                        help="repeat r uses seed + r on every side (so accuracy shows its spread)")
    parser.add_argument("--sides", default="peft,peft-ungrouped,python")
    parser.add_argument("--peft-glue", default=os.path.join(ROOT, "build/pip/examples/peft-glue"))
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "e2e_vs_hf.jsonl"))
    opts = parser.parse_args()
    sides = opts.sides.split(",")
    for s in sides:
        if s not in SIDES:
            sys.exit(f"unknown side {s} ({', '.join(SIDES)})")
    if not os.path.isfile(os.path.join(opts.data_dir, "SST-2", "dev.tsv")):
        sys.exit(f"{opts.data_dir}/SST-2/dev.tsv not found")
    if any(s.startswith("peft") for s in sides) and not os.access(opts.peft_glue, os.X_OK):
        sys.exit(f"{opts.peft_glue} is not built (scripts/test.sh or cmake --build build/pip)")
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)

    results = {s: [] for s in sides}
    with open(opts.out, "a") as log:
        for r in range(opts.repeats):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            for side in order:
                seed = opts.seed + r
                cmd = (python_command(opts, (side == "python-grouped"), seed)
                       if side.startswith("python") else peft_command(opts, (side == "peft"), seed))
                load = os.getloadavg()[0]
                seconds, rss, out = run(cmd)
                acc = accuracy_of(side, out, opts)
                entry = {"side": side, "repeat": r, "seconds": round(seconds, 2),
                         "accuracy": acc, "peak_rss_mib": round(rss, 1), "load1": round(load, 2),
                         "rows": opts.rows, "seed": seed}
                results[side].append(entry)
                log.write(json.dumps(entry) + "\n")
                log.flush()
                print(f"repeat {r + 1}/{opts.repeats} {side:15} {seconds:6.1f} s  accuracy "
                      f"{acc:.4f}  peak {rss:.0f} MiB  load {load:.2f}", flush=True)

    print(f"\nSST-2, first {opts.rows} rows, LoRA, 1 epoch, batch 32, length 64; "
          f"{opts.repeats} interleaved repeats")
    print("| side | wall time, median (min-max) | / Python | accuracy, median (min-max) | "
          "peak RSS, median |")
    print("|---|---|---|---|---|")
    python_median = (statistics.median(e["seconds"] for e in results["python"])
                     if results.get("python") else None)
    for side in sides:
        times = [e["seconds"] for e in results[side]]
        accs = [e["accuracy"] for e in results[side]]
        ratio = (f"{statistics.median(times) / python_median:.2f}x" if python_median else "-")
        print(f"| {side} | {statistics.median(times):.1f} s ({min(times):.1f}-{max(times):.1f}) | "
              f"{ratio} | {100 * statistics.median(accs):.1f} % "
              f"({100 * min(accs):.1f}-{100 * max(accs):.1f}) | "
              f"{statistics.median(e['peak_rss_mib'] for e in results[side]):.0f} MiB |")


if __name__ == "__main__":
    main()
