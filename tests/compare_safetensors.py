#!/usr/bin/env python3
"""Compares two .safetensors files tensor by tensor, with the standard library only.

    compare_safetensors.py A B TOLERANCE [--expect-different]

Both files must hold the same tensor names, dtypes and shapes; the largest absolute difference
over all F32/F64 elements must be at most TOLERANCE. Prints that difference and the tensor it
occurs in. With --expect-different the verdict is inverted (the difference must exceed
TOLERANCE): used to show that the check can fail. Exit status 0 when the verdict holds, 1
otherwise, 2 on unreadable input.
"""
import json
import math
import struct
import sys

FORMATS = {"F32": "f", "F64": "d"}


def read(path):
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        sys.exit(f"{path}: {e.strerror}")
    if len(blob) < 8:
        sys.exit(f"{path}: {len(blob)} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        sys.exit(f"{path}: header of {n} bytes runs past the end of the file ({len(blob)} bytes)")
    header = json.loads(blob[8 : 8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n :]
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        tensors[name] = (info["dtype"], tuple(info["shape"]), data[begin:end])
    return tensors


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    expect_different = "--expect-different" in sys.argv[1:]
    if len(args) != 3:
        sys.exit(__doc__)
    a, b = read(args[0]), read(args[1])
    tolerance = float(args[2])
    if a.keys() != b.keys():
        only_a = sorted(a.keys() - b.keys())[:5]
        only_b = sorted(b.keys() - a.keys())[:5]
        print(f"different tensors: only in {args[0]}: {only_a}; only in {args[1]}: {only_b}")
        return 0 if expect_different else 1
    worst, where, compared = 0.0, "", 0
    for name in sorted(a):
        (da, sa, ba), (db, sb, bb) = a[name], b[name]
        if (da, sa) != (db, sb):
            print(f"{name}: {da}{list(sa)} against {db}{list(sb)}")
            return 0 if expect_different else 1
        if da not in FORMATS:
            if ba != bb:
                print(f"{name}: {da} bytes differ")
                return 0 if expect_different else 1
            continue
        fmt = "<%d%s" % (len(ba) // struct.calcsize(FORMATS[da]), FORMATS[da])
        for x, y in zip(struct.unpack(fmt, ba), struct.unpack(fmt, bb)):
            d = abs(x - y)
            if math.isnan(d):
                # NaN on either side is never "within" (a NaN kept in `worst` would let the next
                # comparison replace it).
                d = math.inf
            if d > worst:
                worst, where = d, name
        compared += 1
    print(f"{compared} tensors compared; largest difference {worst:.3g} in {where or '-'} "
          f"(tolerance {tolerance:g})")
    within = worst <= tolerance
    return 0 if within != expect_different else 1


if __name__ == "__main__":
    sys.exit(main())
