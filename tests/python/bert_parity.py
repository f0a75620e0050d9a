#!/usr/bin/env python3
"""Parity of peft's models::Bert with transformers' BertModel on all-MiniLM-L6-v2.

Usage: bert_parity.py <path to peft_bert_tool>

Tokenizes a padded batch of single sentences and a padded batch of sentence pairs with
transformers' tokenizer, runs BertModel (eval, fp32) and peft_bert_tool on the same ids, and
requires the last hidden states to agree within 1e-4 at every position, padding included (both
compute padded positions the same way: they attend to the real tokens only). Then saves the model
with save_pretrained(max_shard_size="20MB") (model.safetensors.index.json and its shards, as
transformers writes a large checkpoint) and requires peft's load of that folder to give the same
hidden states.
Prints "parity: bert passed" and exits 0 only when everything matches.
"""

import os
import subprocess
import sys
import tempfile

from parity_common import model_folder

TOLERANCE = 1e-4


SINGLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "Parameter-efficient fine-tuning trains a few hundred thousand parameters instead of millions.",
    "Crème brûlée and naïve café owners in São Paulo.",
]
PAIRS = [
    ("A man is playing a guitar.", "Someone plays an instrument."),
    ("Is it raining?", "The streets are dry and the sun is out, so probably not."),
    ("short", "also short"),
]


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bert_parity.py <path to peft_bert_tool>")
    tool = sys.argv[1]
    import logging
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()

    folder = model_folder()
    tokenizer = transformers.BertTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()
    batches = {
        "singles": tokenizer(SINGLES, padding=True, return_tensors="pt"),
        "pairs": tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True,
                           return_tensors="pt"),
    }
    def hidden_diff(tmp, name, model_folder, inputs):
        """peft's last hidden state for `inputs` from `model_folder` against transformers':
        (max abs diff, max abs diff over real tokens), or None after printing why not."""
        src, out = os.path.join(tmp, name + ".in"), os.path.join(tmp, name + ".out")
        save_file(inputs, src)
        run = subprocess.run([tool, "hidden", model_folder, src, out], capture_output=True,
                             text=True)
        if run.returncode != 0:
            print(f"parity: {name}: peft_bert_tool failed: {run.stderr.strip()}")
            return None
        ours = load_file(out)["hidden"]
        with torch.no_grad():
            ref = model(**inputs).last_hidden_state
        if ours.shape != ref.shape:
            print(f"parity: {name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}")
            return None
        real = inputs["attention_mask"].bool()
        return (ours - ref).abs().max().item(), (ours - ref).abs()[real].max().item()

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {}
        for name, batch in batches.items():
            inputs[name] = {k: batch[k].to(torch.int64).contiguous()
                            for k in ("input_ids", "attention_mask", "token_type_ids")}
            assert (inputs[name]["attention_mask"] == 0).any(), \
                f"{name}: the batch should be padded"
            diffs = hidden_diff(tmp, name, folder, inputs[name])
            if diffs is None or not diffs[0] <= TOLERANCE:
                failed = True
            if diffs is not None:
                print(f"parity: {name} {tuple(inputs[name]['input_ids'].shape)}: max abs diff "
                      f"{diffs[0]:.3g} (real tokens {diffs[1]:.3g})")
        # The same model saved as shards: peft reads model.safetensors.index.json.
        sharded = os.path.join(tmp, "sharded")
        model.save_pretrained(sharded, max_shard_size="20MB", safe_serialization=True)
        files = sorted(os.listdir(sharded))
        shards = [f for f in files if f.endswith(".safetensors")]
        if "model.safetensors.index.json" not in files or len(shards) < 2:
            print(f"parity: sharded: expected an index and several shards, got {files}")
            failed = True
        else:
            diffs = hidden_diff(tmp, "sharded", sharded, inputs["singles"])
            if diffs is None or not diffs[0] <= TOLERANCE:
                failed = True
            if diffs is not None:
                print(f"parity: sharded ({len(shards)} shards): max abs diff {diffs[0]:.3g}")
    if failed:
        sys.exit("parity: FAILED")
    print("parity: bert passed")


if __name__ == "__main__":
    main()
