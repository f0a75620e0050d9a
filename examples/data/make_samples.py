#!/usr/bin/env python3
"""Writes the small sentiment data sets bundled with the examples.

Every sentence is composed here from the word lists below (no rows of any published data
set), deterministically, so re-running the script reproduces the files byte for byte:

  sst2/train.tsv, sst2/dev.tsv           GLUE SST-2 layout: header "sentence<TAB>label",
                                         lower-case, space-separated tokens, 1 = positive
  chnsenticorp/train.txt, dev.txt        ChnSentiCorp layout: "text<TAB>label", no header

Usage: python3 examples/data/make_samples.py
"""

import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

# --- English, SST-2 style ----------------------------------------------------------------

SUBJECTS = ["the film", "this movie", "the story", "the script", "the cast", "the director",
            "the ending", "the soundtrack", "the dialogue", "the lead actor", "the sequel",
            "the camera work", "the pacing", "the plot", "the whole thing", "the comedy",
            "the drama", "the animation", "the final act", "the premise"]
INTENSIFIERS = ["", "", "really ", "truly ", "wonderfully ", "thoroughly ", "genuinely ",
                "remarkably "]
NEG_INTENSIFIERS = ["", "", "really ", "painfully ", "utterly ", "hopelessly ", "simply ",
                    "terribly "]
POS_ADJ = ["charming", "delightful", "moving", "funny", "clever", "gripping", "beautiful",
           "heartfelt", "brilliant", "warm", "witty", "touching", "thrilling", "joyful",
           "inventive", "lovely", "powerful", "smart", "engaging", "uplifting"]
NEG_ADJ = ["dull", "boring", "clumsy", "tedious", "lifeless", "forgettable", "awful", "bland",
           "tiresome", "sloppy", "pointless", "shallow", "dreary", "annoying", "flat",
           "predictable", "messy", "lazy", "empty", "painful"]
POS_NOUN = ["treat", "gem", "triumph", "pleasure", "delight", "joy", "crowd-pleaser",
            "masterpiece", "winner", "surprise"]
NEG_NOUN = ["mess", "bore", "disaster", "letdown", "chore", "failure", "waste of time",
            "disappointment", "slog", "misfire"]
POS_CLAUSE = ["i laughed all the way through", "you will leave smiling",
              "it is worth every minute", "i would gladly watch it again",
              "the audience cheered at the end", "it stays with you for days",
              "every scene feels alive", "it earns its big moments"]
NEG_CLAUSE = ["i nearly fell asleep", "you will check your watch",
              "it wastes a good cast", "i wanted my money back",
              "the audience walked out early", "nothing here makes sense",
              "every scene drags on", "it never finds its footing"]


def english(rng, positive):
    adj = POS_ADJ if positive else NEG_ADJ
    intens = INTENSIFIERS if positive else NEG_INTENSIFIERS
    noun = POS_NOUN if positive else NEG_NOUN
    clause = POS_CLAUSE if positive else NEG_CLAUSE
    form = rng.randrange(6)
    if form == 0:
        return f"{rng.choice(SUBJECTS)} is {rng.choice(intens)}{rng.choice(adj)}"
    if form == 1:
        a, b = rng.sample(adj, 2)
        return f"a {a} and {b} {rng.choice(['film', 'movie', 'picture', 'comedy', 'drama'])}"
    if form == 2:
        return f"{rng.choice(SUBJECTS)} is a {rng.choice(intens)}{rng.choice(adj)} {rng.choice(noun)}"
    if form == 3:
        return f"{rng.choice(adj)} , {rng.choice(adj)} and {rng.choice(clause)}"
    if form == 4:
        return f"{rng.choice(clause)} ; {rng.choice(SUBJECTS)} is {rng.choice(adj)}"
    return f"what a {rng.choice(adj)} {rng.choice(noun)}"


# --- Chinese, ChnSentiCorp style -----------------------------------------------------------

ZH_ASPECTS_POS = [("房间", ["很干净", "宽敞明亮", "布置得很温馨", "非常安静"]),
                  ("服务", ["很热情", "周到细致", "让人满意", "非常专业"]),
                  ("早餐", ["品种丰富", "味道不错", "很新鲜"]),
                  ("位置", ["很方便", "交通便利", "离地铁很近"]),
                  ("屏幕", ["清晰细腻", "色彩很好", "看着很舒服"]),
                  ("电池", ["很耐用", "续航出色", "充电很快"]),
                  ("快递", ["很快", "第二天就到了", "送货及时"]),
                  ("包装", ["很结实", "完好无损", "做得很用心"]),
                  ("这本书", ["内容精彩", "写得很生动", "值得一读"]),
                  ("性价比", ["很高", "超出预期", "非常划算"])]
ZH_ASPECTS_NEG = [("房间", ["又小又暗", "有股霉味", "隔音很差", "不太干净"]),
                  ("服务", ["态度冷淡", "效率太低", "让人失望", "很不耐烦"]),
                  ("早餐", ["品种太少", "味道很差", "都是凉的"]),
                  ("位置", ["很偏僻", "打车都难", "周边很吵"]),
                  ("屏幕", ["有坏点", "亮度不够", "看久了眼睛累"]),
                  ("电池", ["不耐用", "半天就没电", "充电很慢"]),
                  ("快递", ["太慢了", "拖了一周才到", "送错了地址"]),
                  ("包装", ["破了", "很简陋", "压坏了"]),
                  ("这本书", ["内容空洞", "印刷模糊", "读起来很无聊"]),
                  ("价格", ["太贵了", "不值这个钱", "偏高"])]
ZH_OPEN_POS = ["", "总体来说，", "这次体验很好，", "说实话，"]
ZH_OPEN_NEG = ["", "总体来说，", "这次体验很糟，", "说实话，"]
ZH_CLOSE_POS = ["下次还会再来。", "推荐给大家。", "非常满意！", "好评。", "值得购买。"]
ZH_CLOSE_NEG = ["不会再来了。", "不推荐。", "非常失望！", "差评。", "后悔买了。"]


def chinese(rng, positive):
    aspects = ZH_ASPECTS_POS if positive else ZH_ASPECTS_NEG
    (a1, p1), (a2, p2) = rng.sample(aspects, 2)
    opening = rng.choice(ZH_OPEN_POS if positive else ZH_OPEN_NEG)
    closing = rng.choice(ZH_CLOSE_POS if positive else ZH_CLOSE_NEG)
    return f"{opening}{a1}{rng.choice(p1)}，{a2}{rng.choice(p2)}，{closing}"


def unique_rows(rng, make, count, seen):
    """`count` distinct (text, label) rows, balanced, none of them in `seen` (dev != train)."""
    rows = []
    while len(rows) < count:
        positive = len(rows) % 2 == 0
        text = make(rng, positive)
        if text in seen:
            continue
        seen.add(text)
        rows.append((text, "1" if positive else "0"))
    rng.shuffle(rows)
    return rows


def write(path, rows, header=None):
    path = os.path.join(HERE, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        if header:
            f.write(header + "\n")
        for text, label in rows:
            f.write(f"{text}\t{label}\n")


def main():
    rng = random.Random(20240611)
    seen = set()
    write("sst2/train.tsv", unique_rows(rng, english, 400, seen), header="sentence\tlabel")
    write("sst2/dev.tsv", unique_rows(rng, english, 100, seen), header="sentence\tlabel")
    seen = set()
    write("chnsenticorp/train.txt", unique_rows(rng, chinese, 200, seen))
    write("chnsenticorp/dev.txt", unique_rows(rng, chinese, 50, seen))


if __name__ == "__main__":
    main()
