#!/usr/bin/env python3
"""Compares numbers of two JSON reports (peft-lm's report.json, peft-glue's result.json), with the
standard library only.

    compare_reports.py A B TOLERANCE KEY [KEY ...]

Each KEY (a dotted path for a nested value, a number for a list's item:
early_exit.curve.1.accuracy) must be a number in both files, and the two must differ by at most
TOLERANCE. Prints each pair. Exit status 0 when all hold, 1 otherwise, 2 on unreadable input or a
missing key.
"""
import json
import sys


def read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        sys.exit(2)


def lookup(report, key):
    value = report
    for part in key.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def main():
    if len(sys.argv) < 5:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    a, b = read(sys.argv[1]), read(sys.argv[2])
    tolerance = float(sys.argv[3])
    ok = True
    for key in sys.argv[4:]:
        values = []
        for path, report in ((sys.argv[1], a), (sys.argv[2], b)):
            value = lookup(report, key)
            if value is None:
                print(f"{path}: no number \"{key}\"", file=sys.stderr)
                sys.exit(2)
            values.append(value)
        diff = abs(values[0] - values[1])
        print(f"{key}: {values[0]!r} vs {values[1]!r}, difference {diff:.3g}")
        ok = ok and diff <= tolerance
    print("reports agree" if ok else f"reports differ by more than {tolerance}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
