#!/usr/bin/env python3
"""Writes sample.jsonl beside this script: 40 self-written arithmetic questions with a fixed answer
format ("Sum: a + b = c. Answer: c things.") that the base model does not use, so tuning shows in
the held-out loss and in what peft-lm generates. Deterministic (seed 7)."""

import json
import os
import random

random.seed(7)
names = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells"]
rows = []
for i in range(40):
    a, b = random.randint(2, 40), random.randint(2, 40)
    thing = random.choice(names)
    if i % 2 == 0:
        rows.append({"prompt": f"I have {a} {thing} and get {b} more. How many {thing} do I have?",
                     "completion": f"Sum: {a} + {b} = {a + b}. Answer: {a + b} {thing}."})
    else:
        big, small = max(a, b), min(a, b)
        rows.append({"prompt": f"I have {big} {thing} and give away {small}. How many are left?",
                     "completion": f"Difference: {big} - {small} = {big - small}. "
                                   f"Answer: {big - small} {thing}."})
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.jsonl"), "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
