"""Kills peft-glue with SIGKILL at several points of a run and checks that --resume ends exactly
where an uninterrupted run ends, and that no good checkpoint is ever lost or half-written.

Usage: crash_resume.py PEFT_GLUE SST2_SAMPLE_DIR WORK_DIR

The run: LoRA on the SST-2 sample, 64 rows, batches of 8 (8 steps), a checkpoint every 2 steps.
Kill points:
  - while a checkpoint is being written: `strace --inject` delivers SIGKILL on entry to the n-th
    fsync of the run, chosen from a traced reference run among the fsyncs of files inside a
    checkpoint's temporary folder, of that folder, of the output folder after the rename, and of
    the final adapter;
  - mid-step: SIGKILL from outside, shortly after a checkpoint appears.
After each kill: every checkpoint-N folder is complete (its manifest and files readable), the
newest checkpoint completed before the kill is still there, and `--resume` finishes with an
adapter equal to the uninterrupted run's bit for bit (and the same metric).
Prints "crash-resume: passed" and exits 0 only when all of that holds.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from safetensors.numpy import load_file


def fail(msg):
    print(f"crash-resume: FAILED: {msg}")
    sys.exit(1)


if len(sys.argv) != 4:
    sys.exit(__doc__)
PROGRAM, DATA, WORK = sys.argv[1:]
STRACE = shutil.which("strace")
if STRACE is None:
    fail("strace is not installed (scripts/test.sh installs it)")

ARGS = [PROGRAM, "--task", "sst2", "--method", "lora", "--data-dir", DATA,
        "--max-train-samples", "64", "--max-eval-samples", "16", "--batch-size", "8",
        "--max-len", "32", "--epochs", "1", "--seed", "3", "--save-every", "2", "--threads", "1"]
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def run(out, extra=(), prefix=(), timeout=300):
    return subprocess.run([*prefix, *ARGS, "--output", out, *extra], capture_output=True,
                          text=True, timeout=timeout)


def adapter(out):
    path = os.path.join(out, "adapter_model.safetensors")
    if not os.path.isfile(path):
        fail(f"{path} is missing")
    return load_file(path)


def checkpoints(out):
    """step -> folder of every checkpoint-N folder in `out`, each checked to be complete."""
    found = {}
    for name in os.listdir(out):
        m = CHECKPOINT.match(name)
        if not m:
            continue
        folder = os.path.join(out, name)
        manifest_path = os.path.join(folder, "manifest.json")
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"{folder} is not a complete checkpoint: manifest.json unreadable ({e})")
        if manifest.get("state", {}).get("global_step") != int(m.group(1)):
            fail(f"{folder}: manifest.json says step {manifest.get('state', {}).get('global_step')}")
        for file in ("trainable.safetensors", "rng.safetensors", "optimizer.pt"):
            path = os.path.join(folder, file)
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                fail(f"{folder} is not a complete checkpoint: {file} is missing or empty")
        try:
            load_file(os.path.join(folder, "trainable.safetensors"))
            load_file(os.path.join(folder, "rng.safetensors"))
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            fail(f"{folder}: a tensor file is unreadable ({e})")
        found[int(m.group(1))] = folder
    return found


def result_line(proc, what):
    if proc.returncode != 0:
        fail(f"{what} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_adapter(out, reference, what):
    got = adapter(out)
    if sorted(got) != sorted(reference):
        fail(f"{what}: the adapter's tensors {sorted(got)} differ from {sorted(reference)}")
    for k, v in reference.items():
        if v.shape != got[k].shape or v.tobytes() != got[k].tobytes():
            fail(f"{what}: tensor {k} differs from the uninterrupted run's")


os.makedirs(WORK, exist_ok=True)

# The uninterrupted run, traced: which fsyncs write checkpoints, which renames complete them.
ref_out = os.path.join(WORK, "reference")
shutil.rmtree(ref_out, ignore_errors=True)
trace = os.path.join(WORK, "reference.strace")
proc = run(ref_out, ["--overwrite"],
           [STRACE, "-f", "-qq", "-y", "-e", "trace=fsync,rename,renameat2", "-o", trace])
reference_result = result_line(proc, "the reference run")
reference = adapter(ref_out)

events = []  # ("fsync", path) or ("rename", target), in order
with open(trace) as f:
    for line in f:
        m = re.search(r"\bfsync\(\d+<([^>]*)>", line)
        if m:
            events.append(("fsync", m.group(1)))
            continue
        m = re.search(r"\brename(?:at2)?\(.*\"([^\"]*)\"(?:, \w+)?\) = 0", line)
        if m:
            events.append(("rename", m.group(1)))
fsyncs = [i for i, e in enumerate(events) if e[0] == "fsync"]
if not fsyncs:
    fail(f"no fsync in the reference run's trace {trace}")


def choose(predicate):
    """1-based fsync numbers (as strace counts them) of the fsyncs matching `predicate`."""
    return [n + 1 for n, i in enumerate(fsyncs) if predicate(events[i][1])]


in_tmp = choose(lambda p: ".tmp-" in p and not p.endswith(".tmp-") and "checkpoint-" in p)
parent = choose(lambda p: os.path.abspath(p) == os.path.abspath(ref_out))
final = choose(lambda p: os.path.basename(p).startswith("adapter_model.safetensors"))
if not in_tmp or not parent:
    fail(f"the trace shows no checkpoint being written (fsyncs: {[events[i][1] for i in fsyncs]})")
# First file of the first checkpoint, a file in the middle of the run, the folder sync of a
# later checkpoint, the parent folder after a rename, and the final adapter.
points = sorted({in_tmp[0], in_tmp[len(in_tmp) // 2], in_tmp[-1], parent[len(parent) // 2]}
                | ({final[0]} if final else set()))


def completed_before(fsync_number):
    """Steps of the checkpoints whose rename completed before the given fsync."""
    index = fsyncs[fsync_number - 1]
    steps = []
    for kind, path in events[:index]:
        m = CHECKPOINT.match(os.path.basename(path)) if kind == "rename" else None
        if m:
            steps.append(int(m.group(1)))
    return steps


def resume_and_check(out, what):
    proc = run(out, ["--resume"])
    result = result_line(proc, f"the resumed run after {what}")
    same_adapter(out, reference, what)
    if result["value"] != reference_result["value"]:
        fail(f"{what}: resumed metric {result['value']} != {reference_result['value']}")
    leftovers = [n for n in os.listdir(out) if ".tmp-" in n]
    if leftovers:
        fail(f"{what}: temporary folders left after the resumed run: {leftovers}")


for n in points:
    what = f"SIGKILL at fsync {n} ({events[fsyncs[n - 1]][1]})"
    out = os.path.join(WORK, f"kill-fsync-{n}")
    shutil.rmtree(out, ignore_errors=True)
    proc = run(out, ["--overwrite"],
               [STRACE, "-f", "-qq", "-o", os.devnull, "-e", "trace=fsync",
                "-e", f"inject=fsync:signal=SIGKILL:when={n}"])
    if proc.returncode == 0:
        fail(f"{what}: the run was not killed")
    present = checkpoints(out)
    done = completed_before(n)
    if done and max(done) not in present:
        fail(f"{what}: checkpoint-{max(done)}, complete before the kill, is gone "
             f"(present: {sorted(present)})")
    resume_and_check(out, what)
    print(f"{what}: checkpoints after the kill {sorted(present)}; resumed run identical")

# Mid-step: killed from outside soon after the first checkpoint appears.
for delay in (0.0, 0.15):
    what = f"SIGKILL {delay:.2f} s after checkpoint-2 appeared"
    out = os.path.join(WORK, f"kill-step-{delay:.2f}")
    shutil.rmtree(out, ignore_errors=True)
    child = subprocess.Popen([*ARGS, "--output", out, "--overwrite"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(out, "checkpoint-2")) and child.poll() is None:
        if time.time() > deadline:
            child.kill()
            fail(f"{what}: checkpoint-2 did not appear within 120 s")
        time.sleep(0.002)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if child.returncode != -signal.SIGKILL:
        fail(f"{what}: the run ended ({child.returncode}) before it was killed")
    present = checkpoints(out)
    if 2 not in present:
        fail(f"{what}: checkpoint-2 is gone (present: {sorted(present)})")
    resume_and_check(out, what)
    print(f"{what}: checkpoints after the kill {sorted(present)}; resumed run identical")

print(f"crash-resume: passed ({len(points)} kills while writing, 2 mid-step)")
