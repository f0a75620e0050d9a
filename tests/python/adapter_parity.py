#!/usr/bin/env python3
"""Adapter files shared between peft (C++) and Hugging Face PEFT, on all-MiniLM-L6-v2.

Usage: adapter_parity.py <path to peft_bert_tool>

(a) peft_bert_tool puts a LoRA (r 4, query/value, random non-zero B) and a random 2-label head on
    the model, saves the adapter and writes its logits; PEFT loads the folder with
    PeftModel.from_pretrained on BertForSequenceClassification and must give the same logits.
    The same for IA3 (PEFT's BERT defaults), DoRA, VeRA, LoHa and LoKr, attached from JSON
    options through the registry, every parameter perturbed.
(b) PEFT creates LoRA, prompt-tuning, prefix-tuning, IA3, DoRA, VeRA, LoHa and LoKr adapters with non-identity
    weights and a random head and saves them; peft_bert_tool loads each and must give PEFT's
    logits.
Logits must agree within 1e-4. Prints "parity: adapter passed" and exits 0 only when all do.
"""

import os
import subprocess
import sys
import tempfile

from parity_common import model_folder, move_off_start

TOLERANCE = 1e-4


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: adapter_parity.py <path to peft_bert_tool>")
    tool = sys.argv[1]
    import logging
    import warnings
    import torch
    import transformers
    import peft
    from safetensors.torch import load_file, save_file
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()

    folder = model_folder()
    tokenizer = transformers.BertTokenizer.from_pretrained(folder)
    batch = tokenizer(["A man is playing a guitar.", "Is it raining?", "Hello!"],
                      ["Someone plays an instrument.", "No, the sun is out.", "Hi."],
                      padding=True, return_tensors="pt")
    inputs = {k: batch[k].to(torch.int64).contiguous()
              for k in ("input_ids", "attention_mask", "token_type_ids")}

    def base():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2)

    def logits_of(model):
        model.eval()
        with torch.no_grad():
            return model(**inputs).logits

    failed = []

    def compare(name, ours, ref):
        diff = (ours - ref).abs().max().item()
        spread = ref.abs().max().item()
        print(f"parity: {name}: logits {tuple(ref.shape)}, max abs diff {diff:.3g} "
              f"(largest logit {spread:.3g})")
        if not diff <= TOLERANCE:
            failed.append(name)

    def run_tool(*args):
        run = subprocess.run([tool, *args], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"peft_bert_tool {args[0]} failed: {run.stderr.strip()}")

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "inputs.safetensors")
        out = os.path.join(tmp, "logits.safetensors")
        save_file(inputs, src)

        # (a) C++ -> Python
        adapter = os.path.join(tmp, "cpp_lora")
        run_tool("save-lora", folder, src, adapter, out)
        ours = load_file(out)["logits"]
        ref_model = peft.PeftModel.from_pretrained(base(), adapter)
        compare("C++ LoRA loaded by PEFT", ours, logits_of(ref_model))
        for method, options in (("ia3", "{}"),
                                ("dora", '{"r": 4, "lora_alpha": 8, '
                                         '"target_modules": ["query", "value", "linear1"]}'),
                                ("vera", '{"r": 8, "target_modules": ["query", "linear1"]}'),
                                ("loha", '{"r": 4, "alpha": 8, "target_modules": ["key", "linear2"]}'),
                                ("lokr", '{"r": 4, "alpha": 8, "target_modules": ["query", "linear1"]}')):
            adapter = os.path.join(tmp, "cpp_" + method)
            run_tool("save", method, options, folder, src, adapter, out)
            ours = load_file(out)["logits"]
            ref_model = peft.PeftModel.from_pretrained(base(), adapter)
            compare(f"C++ {method} loaded by PEFT", ours, logits_of(ref_model))
            if method == "vera":
                # peft draws VeRA's shared matrices as PEFT does from projection_prng_key 0: a
                # fresh PEFT model with the same sites must hold the very same values.
                fresh = peft.get_peft_model(base(), peft.VeraConfig(
                    task_type=peft.TaskType.SEQ_CLS, r=8, projection_prng_key=0,
                    target_modules=["query", "intermediate.dense"]))
                saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
                for name in ("vera_A", "vera_B"):
                    same = torch.equal(getattr(fresh.base_model, name)["default"],
                                       saved["base_model." + name])
                    print(f"parity: VeRA {name} drawn like PEFT's: {'equal' if same else 'DIFFERENT'}")
                    if not same:
                        failed.append(f"VeRA {name} draw")

        # (b) Python -> C++
        configs = {
            "lora": peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=16,
                                    target_modules=["query", "value", "intermediate.dense"]),
            "prompt": peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS,
                                              num_virtual_tokens=5),
            "prefix": peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_CLS,
                                              num_virtual_tokens=4),
            "ia3": peft.IA3Config(task_type=peft.TaskType.SEQ_CLS),
            "dora": peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=16,
                                    use_dora=True,
                                    target_modules=["query", "value", "intermediate.dense"]),
            "vera": peft.VeraConfig(task_type=peft.TaskType.SEQ_CLS, r=8,
                                    target_modules=["query", "value", "intermediate.dense"]),
            "loha": peft.LoHaConfig(task_type=peft.TaskType.SEQ_CLS, r=4, alpha=8,
                                    target_modules=["key", "output.dense"]),
            "lokr": peft.LoKrConfig(task_type=peft.TaskType.SEQ_CLS, r=4, alpha=8,
                                    target_modules=["query", "intermediate.dense"]),
        }
        for name, config in configs.items():
            model = base()
            with torch.no_grad():
                model.classifier.weight.normal_(0.0, 0.5)
                model.classifier.bias.normal_(0.0, 0.5)
            model = peft.get_peft_model(model, config)
            torch.manual_seed(1)
            move_off_start(model, prompt_std=0.5)
            ref = logits_of(model)
            adapter = os.path.join(tmp, "py_" + name)
            model.save_pretrained(adapter)
            run_tool("load", folder, adapter, src, out)
            compare(f"PEFT {name} loaded by C++", load_file(out)["logits"], ref)

    if failed:
        sys.exit("parity: FAILED: " + ", ".join(failed))
    print("parity: adapter passed")


if __name__ == "__main__":
    main()
