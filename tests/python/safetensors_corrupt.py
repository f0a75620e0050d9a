"""Python's safetensors as the reference for tests/test_safetensors.cpp.

  write PATH        write the reference tensors and metadata with safetensors.torch.save_file
  check PATH        load PATH with safetensors.torch.load_file and compare with the reference
  reject PATH...    expect Python's safetensors to refuse every file (the corrupt cases the
                    C++ reader rejects are corrupt for the reference implementation too)

Exits non-zero, saying why, on any mismatch. The reference values are spelled out again in the
C++ test; both sides must agree for the interop tests to pass.
"""

import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FLOATS = [0.5, -1.25, 3.0, -4.75, 1024.0, 0.0078125]
REFERENCE = {
    "t.f64": torch.tensor(FLOATS, dtype=torch.float64).reshape(2, 3),
    "t.f32": torch.tensor(FLOATS, dtype=torch.float32).reshape(2, 3),
    "t.f16": torch.tensor(FLOATS, dtype=torch.float16).reshape(2, 3),
    "t.bf16": torch.tensor(FLOATS, dtype=torch.bfloat16).reshape(2, 3),
    "t.i64": torch.tensor([-(2**40), 2**40 + 1, -1, 0, 7, 2**63 - 1], dtype=torch.int64).reshape(2, 3),
    "t.i32": torch.tensor([-(2**31), 2**31 - 1, -1, 0, 1, 12345], dtype=torch.int32).reshape(2, 3),
    "t.i16": torch.tensor([-32768, 32767, -1, 0, 1, 300], dtype=torch.int16).reshape(2, 3),
    "t.i8": torch.tensor([-128, 127, -1, 0, 1, 42], dtype=torch.int8).reshape(2, 3),
    "t.u8": torch.tensor([0, 255, 1, 128, 7, 200], dtype=torch.uint8).reshape(2, 3),
    "t.bool": torch.tensor([True, False, True, True, False, False]).reshape(2, 3),
    "scalar": torch.tensor(3.5, dtype=torch.float32),
    "empty": torch.zeros(0, 4, dtype=torch.float32),
}
METADATA = {"format": "pt", "note": "h\u00e9llo"}


def write(path):
    save_file(REFERENCE, path, metadata=METADATA)


def check(path):
    loaded = load_file(path)
    errors = []
    if set(loaded) != set(REFERENCE):
        errors.append(f"names {sorted(loaded)} != {sorted(REFERENCE)}")
    for name, want in REFERENCE.items():
        got = loaded.get(name)
        if got is None:
            continue
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            errors.append(f"{name}: got {got.dtype} {tuple(got.shape)} {got.tolist()}, "
                          f"want {want.dtype} {tuple(want.shape)} {want.tolist()}")
    with safe_open(path, framework="pt") as f:
        if f.metadata() != METADATA:
            errors.append(f"metadata {f.metadata()} != {METADATA}")
    return errors


def reject(paths):
    errors = []
    for path in paths:
        try:
            load_file(path)
        except Exception:  # noqa: BLE001 - any refusal counts; a crash would not reach here
            continue
        errors.append(f"{path}: Python's safetensors accepted it")
    return errors


def main(argv):
    if len(argv) < 3 or argv[1] not in ("write", "check", "reject"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "write":
        write(argv[2])
        return 0
    errors = check(argv[2]) if argv[1] == "check" else reject(argv[2:])
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
