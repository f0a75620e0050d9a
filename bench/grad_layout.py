#!/usr/bin/env python3
"""Prints the memory layout of the gradients that reach q, k and v when attention runs on
sequence-first [L, N, E] tensors, as peft's encoder does: the same projections, views and
scaled_dot_product_attention call as include/peft/functional/attention.hpp, at 32 x 128 with
all-MiniLM-L6-v2's width and heads. docs/BENCHMARKS.md ("Profiling caveat") cites its output.

    python3 bench/grad_layout.py
"""
import torch

L, N, E, H = 128, 32, 384, 12
D = E // H
x = torch.randn(L, N, E, requires_grad=True)
w = torch.randn(3 * E, E) * 0.05
q, k, v = x @ w[:E].T, x @ w[E:2 * E].T, x @ w[2 * E:].T
for name, t in (("q", q), ("k", k), ("v", v)):
    t.register_hook(lambda g, name=name: print(
        f"grad of {name}: shape {tuple(g.shape)} strides {g.stride()} contiguous {g.is_contiguous()}"
        f"; batch-first contiguous {g.transpose(0, 1).is_contiguous()}"))
heads = [t.view(L, N, H, D).permute(1, 2, 0, 3) for t in (q, k, v)]
out = torch.nn.functional.scaled_dot_product_attention(*heads, attn_mask=torch.zeros(N, 1, 1, L))
(out.permute(2, 0, 1, 3).reshape(L, N, E) * torch.randn(L, N, E)).sum().backward()
