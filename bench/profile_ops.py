#!/usr/bin/env python3
"""Sums the op events of Chrome traces per op name and prints them side by side.

    python3 bench/profile_ops.py cpp.trace.json hf.trace.json [--top 25] [--steps N]
    python3 bench/profile_ops.py cpp.trace.json hf.trace.json --parents aten::mul [--steps N]

The traces come from `peft-bench --profile FILE` (LibTorch's profiler) and
`bench/hf_step.py run --profile FILE` (torch.profiler) over the same timed steps. Times are
inclusive (an op's time contains the ops it calls), in milliseconds per step when --steps is
given. Only `aten::` ops are compared; they are the same kernels on both sides, so a difference
points at an op one side calls more often or on differently laid out tensors. --parents OP
instead counts, per side, the innermost event enclosing each OP event (on the same thread):
where the calls of an op come from.
"""
import argparse
import collections
import json


def op_totals(path):
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total = collections.defaultdict(float)
    count = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name.startswith("aten::"):
            total[name] += float(e.get("dur", 0.0)) / 1000.0
            count[name] += 1
    return total, count


def parent_counts(path, op):
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            by_thread[e.get("tid")].append(e)
    count = collections.Counter()
    for thread in by_thread.values():
        thread.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        stack = []
        for e in thread:
            start = float(e["ts"])
            while stack and float(stack[-1]["ts"]) + float(stack[-1].get("dur", 0.0)) <= start:
                stack.pop()
            if e.get("name") == op:
                count[stack[-1]["name"] if stack else "(top level)"] += 1
            stack.append(e)
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cpp")
    parser.add_argument("hf")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--parents", metavar="OP", help="count what encloses each OP event")
    args = parser.parse_args()
    if args.parents:
        for label, path in (("C++", args.cpp), ("Python", args.hf)):
            print(f"{label}: events enclosing {args.parents}, per step")
            for name, n in parent_counts(path, args.parents).most_common(args.top):
                print(f"  {n / args.steps:8.1f}  {name}")
        return
    cpp, cpp_n = op_totals(args.cpp)
    hf, hf_n = op_totals(args.hf)
    names = sorted(set(cpp) | set(hf), key=lambda n: -max(cpp.get(n, 0.0), hf.get(n, 0.0)))
    print(f"{'op':40} {'C++ ms':>10} {'calls':>7} {'Python ms':>10} {'calls':>7} {'C++-Py ms':>10}")
    for name in names[: args.top]:
        c, h = cpp.get(name, 0.0) / args.steps, hf.get(name, 0.0) / args.steps
        print(f"{name[:40]:40} {c:10.1f} {cpp_n[name] // args.steps:7d} {h:10.1f} "
              f"{hf_n[name] // args.steps:7d} {c - h:10.1f}")


if __name__ == "__main__":
    main()
