#!/usr/bin/env python3
"""Parity of peft's WordPiece tokenizer with Hugging Face's BertTokenizer.

Usage: tokenizer_parity.py <path to peft_tokenize>

Encodes a few hundred deterministic strings (English, accents, CJK, Japanese, Korean, Greek,
punctuation, emoji, digits, long words, control characters, whitespace oddities, special tokens
written in the text), alone and as pairs truncated to small max lengths, plus padded batches,
with peft_tokenize and with the Python reference on the real all-MiniLM-L6-v2 vocabulary, and
requires identical input_ids, token_type_ids, attention_mask, tokens and decoded text.

The reference is transformers' pure-Python tokenizer (BertTokenizerLegacy in transformers 5,
the classic "slow" BertTokenizer). The Rust-backed BertTokenizer is compared as well; where it
disagrees with the Python one the Python one is followed and the disagreement is reported.
Prints "parity: tokenizer passed" and exits 0 only when everything matches.
"""

import json
import os
import random
import subprocess
import sys

from parity_common import model_folder


def vocab_folder():
    folder = model_folder()
    if not os.path.isfile(os.path.join(folder, "vocab.txt")):
        sys.exit(f"parity: FAILED: {folder} has no vocab.txt")
    return folder


def reference_tokenizers(folder):
    try:
        import transformers
    except ImportError:
        sys.exit("parity: FAILED: Python package transformers is not installed "
                 "(scripts/test.sh installs it)")
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)
    slow_class = getattr(transformers, "BertTokenizerLegacy", None)
    if slow_class is None:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as slow_class
    slow = slow_class.from_pretrained(folder)
    fast = transformers.BertTokenizer.from_pretrained(folder)
    if type(slow) is type(fast):
        sys.exit(f"parity: FAILED: expected a pure-Python and a Rust tokenizer, got {type(slow)} twice")
    return slow, fast


# Word pools (all characters assigned in Unicode 14, the version Python 3.11 knows).
ENGLISH = ("the quick brown fox jumps over lazy dog tokenizer unaffable running played "
           "parameter efficient fine tuning transformers hello world isn't don't you're "
           "we've I'm it's BERT GPU CPU LoRA adapters embeddings unbelievably "
           "antidisestablishmentarianism Mississippi").split()
ACCENTED = ("café naïve résumé Crème brûlée façade jalapeño São Paulo Zürich Ångström "
            "Dvořák Łódź Ærøskøbing coöperate piñata über Straße İstanbul ıstanbul Ελλάδα "
            "ΟΔΟΣ ΣΑΣ Σ σοφός ΌΣΟΣ Ĳssel ﬁnance").split()
DECOMPOSED = ["e\u0301cole", "A\u030angstro\u0308m", "n\u0303", "\u0301alone", "i\u0307",
              "\u0345", "Ι\u0345"]
CJK = ["北京大学", "我爱自然语言处理", "漢字テスト", "中文，标点。", "𠀀𠀁𪜀", "\uf900\ufa0b", "㐀㒇"]
JAPANESE = ["こんにちは世界", "カタカナ", "ｶﾀｶﾅ", "東京タワー", "ひらがなとカタカナ"]
KOREAN = ["안녕하세요", "한국어 토크나이저", "서울특별시"]
OTHER_SCRIPTS = ["Привет мир", "שלום עולם", "مرحبا بالعالم", "नमस्ते दुनिया", "สวัสดีชาวโลก",
                 "Γειά σου Κόσμε", "Բարեւ", "ሰላም", "ᚠᛇᚻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ＡＢＣ！？"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["…", "—", "–", "«", "»", "“", "”", "‘",
                                                     "’", "¿", "¡", "§", "¶", "†", "•", "‰",
                                                     "°", "±", "×", "÷", "€", "£", "¥", "©",
                                                     "™", "、", "。", "「", "」", "·", "‽"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤖", "✨", "☃", "🎉🎉"]
DIGITS = ["3.14159", "1,000,000", "2024-01-31", "0x1F600", "42", "٣٤٥", "१२३", "½", "²", "⅓"]
ODD_SPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2003", "\u2028", "\u2029",
             "\u0085", "\x1c", "\x0b", "\x0c", "\u200b", "\u200d", "\ufeff"]
CONTROL = ["\x00", "\x07", "\x1b", "\x7f", "\ufffd", "\u00ad", "\ue000", "\U000f0000"]
SPECIAL = ["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "[cls]", "[SEP", "[[SEP]]",
           "x[MASK]y", "[unused0]"]
LONG = ["a" * 100, "b" * 101, "supercalifragilistic" * 6, "ab" * 60 + " end", "x" * 400,
        "é" * 101, "dé" * 50]


def fixed_strings():
    return [
        "", " ", "\n\t ", "Hello, world!", "Hello , world !", "The quick brown fox.",
        "unaffable", "UNAFFABLE", "Crème brûlée", "naïve café", "ΟΔΟΣ ΟΔΟΣ.", "ΣΑΣ ΣΑΣ",
        "Σ", "AΣ", "AΣB", "ΑΣ'Α", "ΑΣ.Α", "ΑΣ\u00adΑ", "ΑΣ\x00Α", "İstanbul", "Straße",
        "ẞ", "北京大学的学生", "我爱NLP!", "漢字とかな", "안녕하세요, 세계!", "hello[SEP]world",
        "[CLS] already [SEP] special", "[cls] lower", "[MAS\x00K]", "[CL\u200bS]",
        "e\u0301cole", "\u0301", "\u0301\u0302", "a\u0301b", "👍", "I ❤️ NLP 🤖",
        "3.14159 is pi", "$100,000.00", "email@example.com", "https://example.com/a?b=c&d=e",
        "C++ & Python's `code`", "it's a dog's life, isn't it?", "tab\tseparated\tvalues",
        "line\nbreaks\r\nand\rcarriage", "nul\x00byte", "bell\x07char", "soft\u00adhyphen",
        "zero\u200bwidth", "bom\ufeffhere", "replacement\ufffdchar", "nbsp\u00a0space",
        "ideographic\u3000space", "line\u2028separator", "para\u2029separator", "nel\u0085x",
        "fs\x1cgs\x1drs\x1eus\x1f", "vt\x0bff\x0c", "a" * 100, "a" * 101, "é" * 100,
        "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ！", "ﬁnance ﬂow", "Ĳssel", "x²+y²", "½ cup",
        "The year 2024 was 25% better than 1999's.", "...", "?!?!", "---", "\"quoted\"",
        "(parenthesised) [bracketed] {braced}", "a/b\\c|d", "~tilde^caret_underscore",
        "mixed 中文 and English 和 한국어 and にほんご", "Привет, мир!", "שלום", "مرحبا",
        "नमस्ते", "สวัสดี", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U00020000\U00020001", "\uf900", "ｶﾀｶﾅ",
    ]


def random_strings(rng, count):
    pools = [ENGLISH, ACCENTED, DECOMPOSED, CJK, JAPANESE, KOREAN, OTHER_SCRIPTS, PUNCT, EMOJI,
             DIGITS, CONTROL, SPECIAL, LONG]
    weights = [30, 10, 3, 6, 4, 3, 5, 10, 4, 5, 2, 2, 1]
    out = []
    for _ in range(count):
        words = []
        for _ in range(rng.randint(0, 24)):
            pool = rng.choices(pools, weights)[0]
            word = rng.choice(pool)
            if rng.random() < 0.2:
                word = word.upper() if rng.random() < 0.5 else word.title()
            words.append(word)
            words.append(rng.choice(ODD_SPACE) if rng.random() < 0.15 else
                         ("" if rng.random() < 0.1 else " "))
        out.append("".join(words))
    return out


def reference_encode(tok, a, b, max_length):
    enc = tok(a, b, truncation=True, max_length=max_length if max_length else 512,
              return_token_type_ids=True, return_attention_mask=True)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
            "attention_mask": enc["attention_mask"]}


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: tokenizer_parity.py <path to peft_tokenize>")
    tool = sys.argv[1]
    folder = vocab_folder()
    slow, fast = reference_tokenizers(folder)
    rng = random.Random(20240531)

    singles = fixed_strings() + random_strings(rng, 300)
    requests = [{"a": s} for s in singles]
    pair_count = 200
    for _ in range(pair_count):
        a, b = rng.choice(singles), rng.choice(singles)
        request = {"a": a, "b": b}
        if rng.random() < 0.8:
            request["max_length"] = rng.choice([3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 64])
        requests.append(request)
    for max_length in [2, 3, 4, 5, 8]:
        requests.append({"a": "short", "max_length": max_length})
        requests.append({"a": "a somewhat longer first sentence here", "max_length": max_length})
    batches = []
    for _ in range(20):
        n = rng.randint(1, 6)
        batch = {"batch": [rng.choice(singles) for _ in range(n)]}
        if rng.random() < 0.5:
            batch["pairs"] = [rng.choice(singles) for _ in range(n)]
        if rng.random() < 0.7:
            batch["max_length"] = rng.choice([4, 8, 16, 32])
        batches.append(batch)
    # A pair cannot be encoded in fewer than three tokens: peft refuses, Python overflows.
    bad = [{"a": "one", "b": "two", "max_length": 2}, {"a": "one", "max_length": 1}]

    all_requests = requests + batches + bad
    stdin = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in all_requests)
    run = subprocess.run([tool, folder], input=stdin.encode(), capture_output=True, timeout=300)
    if run.returncode != 0:
        sys.exit(f"parity: FAILED: {tool} exited with {run.returncode}: "
                 f"{run.stderr.decode(errors='replace')}")
    replies = [json.loads(line) for line in run.stdout.decode().splitlines()]
    if len(replies) != len(all_requests):
        sys.exit(f"parity: FAILED: sent {len(all_requests)} requests, got {len(replies)} replies")

    failures = []
    fast_disagreements = []
    compared = {"single": 0, "pair": 0, "batch": 0, "error": 0}

    def report(kind, request, field, ours, theirs):
        failures.append(f"{kind} {json.dumps(request, ensure_ascii=True)}: {field}\n"
                        f"    peft: {ours}\n    HF:   {theirs}")

    for request, reply in zip(requests, replies):
        a, b, max_length = request["a"], request.get("b"), request.get("max_length")
        kind = "pair" if b is not None else "single"
        if max_length is not None and max_length < (3 if b is not None else 2):
            if "error" not in reply:
                report(kind, request, "error", reply, "an error (max_length below specials)")
            compared["error"] += 1
            continue
        if "error" in reply:
            report(kind, request, "error", reply["error"], "no error")
            continue
        expected = reference_encode(slow, a, b, max_length)
        for field in ("input_ids", "token_type_ids", "attention_mask"):
            if reply[field] != expected[field]:
                report(kind, request, field, reply[field], expected[field])
        tokens = slow.tokenize(a)
        if reply["tokens"] != tokens:
            report(kind, request, "tokens", reply["tokens"], tokens)
        decoded = slow.decode(expected["input_ids"], skip_special_tokens=True)
        if reply["decode"] != decoded:
            report(kind, request, "decode", reply["decode"], decoded)
        if reference_encode(fast, a, b, max_length) != expected:
            fast_disagreements.append(request)
        compared[kind] += 1

    for request, reply in zip(batches, replies[len(requests):]):
        texts, pairs = request["batch"], request.get("pairs")
        kwargs = {"padding": True, "truncation": True, "return_token_type_ids": True,
                  "max_length": request.get("max_length", 512)}
        expected = slow(texts, pairs, **kwargs) if pairs else slow(texts, **kwargs)
        for field in ("input_ids", "token_type_ids", "attention_mask"):
            if reply.get(field) != expected[field]:
                report("batch", request, field, reply.get(field), expected[field])
        compared["batch"] += 1

    for request, reply in zip(bad, replies[len(requests) + len(batches):]):
        if "error" not in reply or "max_length" not in reply["error"]:
            report("invalid", request, "error", reply, "an error naming max_length")
        compared["error"] += 1

    print(f"parity: compared {compared['single']} single sentences, {compared['pair']} pairs, "
          f"{compared['batch']} padded batches, {compared['error']} invalid max_length requests")
    if fast_disagreements:
        print(f"parity: note: the Rust BertTokenizer disagrees with the Python one (followed here) "
              f"on {len(fast_disagreements)} inputs, e.g. "
              f"{json.dumps(fast_disagreements[0], ensure_ascii=True)}")
    else:
        print("parity: the Rust BertTokenizer agrees with the Python one on every input")
    if failures:
        for f in failures[:30]:
            print("MISMATCH " + f)
        print(f"parity: FAILED: {len(failures)} mismatches")
        return 1
    print("parity: tokenizer passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
