#!/usr/bin/env python3
"""Parity of peft's Unigram (SentencePiece) tokenizer with Hugging Face `tokenizers`.

Usage: unigram_parity.py <path to peft_tokenize>

On the converted multilingual-e5-small folder (XLM-R's 250k unigram pieces, scripts/convert_e5.py),
encodes several hundred deterministic strings (simplified and traditional Chinese, full-width
punctuation, English, mixed scripts, numbers, emoji, control characters, whitespace oddities,
special tokens written in the text, empty and very long inputs) alone, as pairs truncated to
small lengths and as padded batches, with peft_tokenize and with `tokenizers.Tokenizer` reading
the same tokenizer.json, and requires identical ids, token types, masks, tokens and decoded text.
Prints "parity: unigram passed" and exits 0 only when everything matches.
"""

import json
import random
import subprocess
import sys

from parity_common import e5_folder
from tokenizer_parity import (ACCENTED, CJK, CONTROL, DECOMPOSED, DIGITS, EMOJI, ENGLISH,
                              JAPANESE, KOREAN, ODD_SPACE, OTHER_SCRIPTS, PUNCT, fixed_strings)

SIMPLIFIED = ("我 爱 自然 语言 处理 北京 上海 深圳 今天 天气 很好 这个 手机 的 电池 续航 怎么样 "
              "花呗 借呗 还款 逾期 会 影响 信用 吗 蚂蚁 金服 酒店 房间 干净 服务 态度 差 "
              "早餐 一般 位置 不错 下次 还 来 小明 说 他 她 它 们 为什么 如何 申请 额度").split()
TRADITIONAL = ("臺灣 國語 廣東話 繁體 中文 電腦 軟體 學習 語言 處理 資訊 網路 銀行 "
               "飯店 環境 舒適 價格 實惠 應該 沒有 問題 謝謝 這樣 們").split()
FULLWIDTH = list("，。！？：；、（）《》“”‘’【】…—～·") + ["　", "１２３", "ＡＢＣ", "ａｂｃ",
                                                       "％", "＃", "＠", "＄"]
SENTENCES = ["花呗的额度怎么提升", "借呗还款日可以修改吗？", "这家酒店的位置很好，但是早餐一般。",
             "房間很乾淨，服務態度也很好！", "请问蚂蚁花呗逾期一天会影响信用吗",
             "他说：“明天会下雨。”", "2024年3月15日，价格为¥1,299.00元。",
             "iPhone 15 的电池续航怎么样?", "我用Python写了一个transformer模型",
             "《红楼梦》是中国古典小说", "Hello 世界! 你好 world.", "ChnSentiCorp 情感分析数据集",
             "张三和李四是好朋友，他们经常一起打篮球。", "这个东西一点也不好用……", "💯👍好评！",
             "ＣＬＵＥ基准测试", "北京时间１２点３０分", "第一，第二，第三", "（括号）【方括号】",
             "query: 如何申请花呗", "passage: 花呗是蚂蚁金服推出的消费信贷产品"]
LONG = ["好" * 600, "中文" * 300 + " end", "a" * 1000, "测试 " * 400, "x" * 50 + "的" * 50]
SPECIAL = ["<s>", "</s>", "<pad>", "<unk>", "<mask>", "a<s>b", "x</s>y", "<s", "< s>",
           "<mask> 中文", "中<unk>文", "<<s>>", "</s></s>"]


def random_strings(rng, count):
    pools = [SIMPLIFIED, TRADITIONAL, FULLWIDTH, SENTENCES, ENGLISH, ACCENTED, DECOMPOSED, CJK,
             JAPANESE, KOREAN, OTHER_SCRIPTS, PUNCT, EMOJI, DIGITS, CONTROL, SPECIAL]
    weights = [25, 10, 8, 6, 15, 4, 2, 4, 3, 3, 4, 6, 4, 5, 2, 2]
    out = []
    for _ in range(count):
        words = []
        for _ in range(rng.randint(0, 20)):
            word = rng.choice(rng.choices(pools, weights)[0])
            if rng.random() < 0.15:
                word = word.upper() if rng.random() < 0.5 else word.title()
            words.append(word)
            r = rng.random()
            words.append(rng.choice(ODD_SPACE) if r < 0.15 else ("" if r < 0.5 else " "))
        out.append("".join(words))
    return out


def reference(tok, a, b, max_length):
    tok.enable_truncation(max_length=max_length or 512, strategy="longest_first")
    enc = tok.encode(a, b) if b is not None else tok.encode(a)
    return {"input_ids": enc.ids, "token_type_ids": enc.type_ids,
            "attention_mask": enc.attention_mask}


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: unigram_parity.py <path to peft_tokenize>")
    tool = sys.argv[1]
    folder = e5_folder()
    try:
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("parity: FAILED: Python package tokenizers is not installed "
                 "(scripts/test.sh installs transformers, which brings it)")
    tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
    rng = random.Random(20261130)

    singles = fixed_strings() + SENTENCES + LONG + SPECIAL + FULLWIDTH + random_strings(rng, 460)
    requests = [{"a": s} for s in singles]
    for _ in range(200):
        request = {"a": rng.choice(singles), "b": rng.choice(singles)}
        if rng.random() < 0.8:
            request["max_length"] = rng.choice([4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 64])
        requests.append(request)
    for max_length in [2, 3, 4, 5, 8]:
        requests.append({"a": "短句", "max_length": max_length})
        requests.append({"a": "一个稍微长一点的第一句话在这里", "max_length": max_length})
    batches = []
    for _ in range(20):
        n = rng.randint(1, 6)
        batch = {"batch": [rng.choice(singles) for _ in range(n)]}
        if rng.random() < 0.5:
            batch["pairs"] = [rng.choice(singles) for _ in range(n)]
        if rng.random() < 0.7:
            batch["max_length"] = rng.choice([4, 8, 16, 32])
        batches.append(batch)
    # A pair needs four special tokens here (<s> a </s></s> b </s>): fewer is refused.
    bad = [{"a": "一", "b": "二", "max_length": 3}, {"a": "一", "max_length": 1}]

    all_requests = requests + batches + bad
    stdin = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in all_requests)
    run = subprocess.run([tool, folder], input=stdin.encode(), capture_output=True, timeout=600)
    if run.returncode != 0:
        sys.exit(f"parity: FAILED: {tool} exited with {run.returncode}: "
                 f"{run.stderr.decode(errors='replace')}")
    # Split on "\n" only: decoded text may hold U+2028, U+0085 and the like, which splitlines()
    # would also split on.
    replies = [json.loads(line) for line in run.stdout.decode().split("\n") if line]
    if len(replies) != len(all_requests):
        sys.exit(f"parity: FAILED: sent {len(all_requests)} requests, got {len(replies)} replies")

    failures = []
    compared = {"single": 0, "pair": 0, "batch": 0, "error": 0}

    def report(kind, request, field, ours, theirs):
        failures.append(f"{kind} {json.dumps(request, ensure_ascii=True)[:300]}: {field}\n"
                        f"    peft: {ours}\n    HF:   {theirs}")

    for request, reply in zip(requests, replies):
        a, b, max_length = request["a"], request.get("b"), request.get("max_length")
        kind = "pair" if b is not None else "single"
        if max_length is not None and max_length < (4 if b is not None else 2):
            if "error" not in reply:
                report(kind, request, "error", reply, "an error (max_length below specials)")
            compared["error"] += 1
            continue
        if "error" in reply:
            report(kind, request, "error", reply["error"], "no error")
            continue
        expected = reference(tok, a, b, max_length)
        for field in ("input_ids", "token_type_ids", "attention_mask"):
            if reply[field] != expected[field]:
                report(kind, request, field, reply[field], expected[field])
        tok.no_truncation()
        tokens = [tok.id_to_token(i) for i in tok.encode(a, add_special_tokens=False).ids]
        if reply["tokens"] != tokens:
            report(kind, request, "tokens", reply["tokens"], tokens)
        decoded = tok.decode(expected["input_ids"], skip_special_tokens=True)
        if reply["decode"] != decoded:
            report(kind, request, "decode", reply["decode"], decoded)
        compared[kind] += 1

    for request, reply in zip(batches, replies[len(requests):]):
        n = len(request["batch"])
        pairs = request.get("pairs", [None] * n)
        encs = [reference(tok, a, b, request.get("max_length"))
                for a, b in zip(request["batch"], pairs)]
        length = max(len(e["input_ids"]) for e in encs)
        pad = tok.token_to_id("<pad>")
        expected = {
            "input_ids": [e["input_ids"] + [pad] * (length - len(e["input_ids"])) for e in encs],
            "token_type_ids": [e["token_type_ids"] + [0] * (length - len(e["input_ids"]))
                               for e in encs],
            "attention_mask": [e["attention_mask"] + [0] * (length - len(e["input_ids"]))
                               for e in encs]}
        for field in ("input_ids", "token_type_ids", "attention_mask"):
            if reply.get(field) != expected[field]:
                report("batch", request, field, reply.get(field), expected[field])
        compared["batch"] += 1

    for request, reply in zip(bad, replies[len(requests) + len(batches):]):
        if "error" not in reply or "max_length" not in reply["error"]:
            report("invalid", request, "error", reply, "an error naming max_length")
        compared["error"] += 1

    print(f"parity: compared {compared['single']} single strings, {compared['pair']} pairs, "
          f"{compared['batch']} padded batches, {compared['error']} invalid max_length requests")
    if failures:
        for f in failures[:30]:
            print("MISMATCH " + f)
        print(f"parity: FAILED: {len(failures)} mismatches")
        return 1
    print("parity: unigram passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
