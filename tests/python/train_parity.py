#!/usr/bin/env python3
"""Training parity: peft's Trainer against Hugging Face PEFT + transformers' Trainer.

Usage: train_parity.py <path to peft_bert_tool> [--steps N] [--model minilm|e5] [--only CASES]

For each case (single-sentence classification, sentence-pair classification and sentence-pair
regression, with [CLS] pooling and with mean pooling) both sides start from the same LoRA
(r 8, alpha 16, query/value; PEFT's initialisation, saved by PEFT and loaded by peft) and the same
new head, see the same batches in the same order (tokenised here, padded to each batch's longest
row) and train with the same settings: AdamW (lr 2e-3, weight decay 0.01, none on biases and
LayerNorms), 6 % linear warm-up then linear decay, gradient norm clipped at 1. The model's
dropout is off on both sides (a copy of the model folder whose config.json sets
hidden_dropout_prob and attention_probs_dropout_prob to 0), so the runs are deterministic.

Every step's loss must agree within TOLERANCE (absolute, or relative to the loss when that is
larger). Prints "parity: train passed" and exits 0 only when every case does.

The sentences are the bundled examples/data/sst2/train.tsv (composed for this repository); pairs
join sentence i with sentence i + 7 of the file, labelled 1 (classification) or a score near 5
(regression) when both have the same sentiment. With --model e5 the model is the converted
multilingual-e5-small (12 layers, the Unigram tokenizer, XLM-R pairs) and the sentences the
bundled Chinese examples/data/chnsenticorp/train.txt.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from parity_common import e5_folder, model_folder

# float32 on both sides through different kernels; measured: at most 5e-7 over 32 steps in every
# case (LibTorch 2.13 wheel against PyTorch 2.13, transformers 5.23, PEFT 0.21).
TOLERANCE = 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "examples", "data")
SENTENCES = {"minilm": (os.path.join(DATA, "sst2", "train.tsv"), True),
             "e5": (os.path.join(DATA, "chnsenticorp", "train.txt"), False)}


def no_dropout_copy(folder, dest):
    """The model folder with dropout 0 in config.json; the other files are linked."""
    os.makedirs(dest)
    for name in os.listdir(folder):
        src = os.path.join(folder, name)
        if name == "config.json":
            with open(src) as f:
                config = json.load(f)
            config["hidden_dropout_prob"] = 0.0
            config["attention_probs_dropout_prob"] = 0.0
            with open(os.path.join(dest, name), "w") as f:
                json.dump(config, f)
        elif os.path.isfile(src):
            os.symlink(src, os.path.join(dest, name))
    return dest


def read_sentences(model):
    rows = []
    path, header = SENTENCES[model]
    with open(path, encoding="utf-8") as f:
        if header:
            next(f)
        for line in f:
            text, label = line.rstrip("\n").split("\t")
            rows.append((text, int(label)))
    return rows


def make_batches(tokenizer, task, steps, batch_size, model):
    import torch
    rows = read_sentences(model)
    batches = []
    for step in range(steps):
        a, b, labels = [], [], []
        for k in range(batch_size):
            i = (step * batch_size + k) % len(rows)
            text, label = rows[i]
            a.append(text)
            if task == "single":
                labels.append(label)
            else:
                other, other_label = rows[(i + 7) % len(rows)]
                b.append(other)
                same = label == other_label
                labels.append(float(4.0 + (i % 5) / 5) if task == "regression" and same
                              else float((i % 7) / 7) if task == "regression" else int(same))
        enc = tokenizer(a, b if b else None, padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        dtype = torch.float32 if task == "regression" else torch.int64
        batches.append({"input_ids": enc["input_ids"].to(torch.int64).contiguous(),
                        "attention_mask": enc["attention_mask"].to(torch.int64).contiguous(),
                        "token_type_ids": enc["token_type_ids"].to(torch.int64).contiguous(),
                        "labels": torch.tensor(labels, dtype=dtype)})
    return batches


def mean_pooling_class():
    """BertForSequenceClassification reading the mean of the real tokens' states, as peft's
    Pooling::Mean does (the pooler is left unused)."""
    import torch
    import transformers
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPooled(transformers.BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                    **kwargs):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            logits = self.classifier(self.dropout(pooled))
            loss = None
            if labels is not None:
                if self.num_labels == 1:
                    loss = torch.nn.functional.mse_loss(logits.squeeze(-1), labels)
                else:
                    loss = torch.nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return MeanPooled


def run_python(folder, pooling, num_labels, batches, adapter_dir, work, settings):
    import torch
    import transformers
    import peft

    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification if pooling == "cls" else mean_pooling_class()
    model = cls.from_pretrained(folder, num_labels=num_labels)
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16,
                             target_modules=["query", "value"])
    model = peft.get_peft_model(model, config)
    model.save_pretrained(adapter_dir)

    losses = []

    class Recording(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            value = loss[0] if isinstance(loss, tuple) else loss
            losses.append(value.detach().item())
            return loss

    args = transformers.TrainingArguments(
        output_dir=os.path.join(work, "hf"), per_device_train_batch_size=1, num_train_epochs=1,
        learning_rate=settings["lr"], weight_decay=settings["weight_decay"],
        warmup_steps=settings["warmup_ratio"], lr_scheduler_type="linear",
        max_grad_norm=settings["grad_clip"], optim="adamw_torch", logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, train_sampling_strategy="sequential",
        dataloader_num_workers=0, seed=0, disable_tqdm=True, remove_unused_columns=False)
    trainer = Recording(model=model, args=args, train_dataset=batches,
                        data_collator=lambda features: features[0])
    trainer.train()
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("tool")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", help="run these cases only, comma-separated, e.g. regression-cls")
    parser.add_argument("--model", choices=["minilm", "e5"], default="minilm")
    opts = parser.parse_args()

    import logging
    import warnings
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    settings = {"lr": 2e-3, "weight_decay": 0.01, "warmup_ratio": 0.06, "grad_clip": 1.0}
    cases = [(task, pooling) for task in ("single", "pair", "regression")
             for pooling in ("cls", "mean")]
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        source = e5_folder() if opts.model == "e5" else model_folder()
        folder = no_dropout_copy(source, os.path.join(tmp, "model"))
        if opts.model == "e5":
            tokenizer = transformers.PreTrainedTokenizerFast(
                tokenizer_file=os.path.join(folder, "tokenizer.json"), pad_token="<pad>",
                model_input_names=["input_ids", "token_type_ids", "attention_mask"])
        else:
            tokenizer = transformers.BertTokenizer.from_pretrained(folder)
        for task, pooling in cases:
            name = f"{task}-{pooling}"
            if opts.only and name not in opts.only.split(","):
                continue
            work = os.path.join(tmp, name)
            os.makedirs(work)
            num_labels = 1 if task == "regression" else 2
            batches = make_batches(tokenizer, task, opts.steps, opts.batch_size, opts.model)
            batches_file = os.path.join(work, "batches.safetensors")
            save_file({f"{k}.{i}": v for i, b in enumerate(batches) for k, v in b.items()},
                      batches_file)
            adapter = os.path.join(work, "initial")
            ref = run_python(folder, pooling, num_labels, batches, adapter, work, settings)

            spec = dict(settings, model=folder, adapter=adapter, batches=batches_file,
                        num_labels=num_labels, pooling=pooling, steps=opts.steps)
            spec_file = os.path.join(work, "spec.json")
            with open(spec_file, "w") as f:
                json.dump(spec, f)
            out = os.path.join(work, "losses.safetensors")
            run = subprocess.run([opts.tool, "train", spec_file, out], capture_output=True,
                                 text=True)
            if run.returncode != 0:
                print(f"parity: {name}: peft_bert_tool train failed: {run.stderr.strip()}")
                failed.append(name)
                continue
            ours = load_file(out)["losses"].tolist()
            if len(ours) != len(ref):
                print(f"parity: {name}: {len(ours)} steps in C++, {len(ref)} in Python")
                failed.append(name)
                continue
            worst, worst_step = 0.0, 0
            for step, (a, b) in enumerate(zip(ours, ref)):
                diff = abs(a - b) / max(1.0, abs(b))
                if diff > worst:
                    worst, worst_step = diff, step
            print(f"parity: {name}: {len(ref)} steps, loss {ref[0]:.5f} -> {ref[-1]:.5f} "
                  f"(C++ {ours[0]:.5f} -> {ours[-1]:.5f}), largest difference {worst:.3g} "
                  f"at step {worst_step}")
            if not worst <= TOLERANCE:
                print("parity:   C++    " + " ".join(f"{x:.5f}" for x in ours))
                print("parity:   Python " + " ".join(f"{x:.5f}" for x in ref))
                failed.append(name)
    if failed:
        sys.exit("parity: FAILED: " + ", ".join(failed))
    print("parity: train passed")


if __name__ == "__main__":
    main()
