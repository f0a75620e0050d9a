#!/usr/bin/env python3
"""Markdown table of bench/prompt_glue.sh's results (out/prompt/<task>.jsonl): one row per run
configuration, one column per task, mean ± sample standard deviation over the seeds."""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "out/prompt")
tasks = ["sst2", "mrpc", "rte"]
main_metric = {"sst2": ["accuracy"], "mrpc": ["f1", "accuracy"], "rte": ["accuracy"]}


def label(d):
    if d["shots_per_class"] == 0:
        return "zero-shot prompt" + (", calibrated" if d.get("calibrated") else "")
    if d["mode"] == "head":
        return "classification head, 16 per class"
    if d["mode"] == "pet":
        return "PET (ensemble of the task's prompts, soft labels on unlabelled rows)"
    demos = d["demonstrations"]
    return "prompt, 16 per class" + ("" if demos == "none" else f", {demos} demonstrations")


rows = {}
for task in tasks:
    f = root / f"{task}.jsonl"
    if not f.exists():
        continue
    for line in f.read_text().splitlines():
        d = json.loads(line)
        cells = []
        for m in main_metric[task]:
            mean, std = 100 * d[m + "_mean"], 100 * d[m + "_std"]
            n = len(d["runs"])
            cells.append(f"{mean:.1f}" + (f" ± {std:.1f}" if n > 1 else ""))
        rows.setdefault(label(d), {})[task] = (" / ".join(cells), len(d["runs"]))

print("| run | SST-2 accuracy | MRPC F1 / accuracy | RTE accuracy | seeds |")
print("|---|---|---|---|---|")
for name, per_task in rows.items():
    seeds = sorted({n for _, n in per_task.values()})
    print(f"| {name} | " + " | ".join(per_task.get(t, ("—", 0))[0] for t in tasks)
          + f" | {', '.join(map(str, seeds))} |")
