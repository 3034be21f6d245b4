#!/usr/bin/env python3
"""Peer baseline for `kvserve bench decode` (docs/design.md section 8): Hugging Face transformers
GPT-2 (a dummy:gpt2* geometry, random weights, fp16) decoding with
cache_implementation="static" (which compiles), warmed up on the exact timed shape.

Per batch size B, generate() runs with `warmup` and with `warmup + steps` new tokens from the same
B x context prompt; the difference of the two times over `steps` is the decode-step time, so
prefill and generate()'s setup cancel out. Prints one JSON object per line, like kvserve.
Stops before a batch size when --budget-s seconds have passed (compilation per shape is slow).
"""
import argparse
import json
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

# The geometries of kvserve's dummy:NAME models (engine/checkpoint.cc): layers, heads, width.
GEOMETRIES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
              "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="gpt2", choices=sorted(GEOMETRIES))
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=120.0)
    a = p.parse_args()
    began = time.time()
    torch.manual_seed(0)
    n_layer, n_head, n_embd = GEOMETRIES[a.geometry]
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = GPT2LMHeadModel(config).to(torch.float16).cuda().eval()
    for batch in [int(b) for b in a.batches.split(",")]:
        if time.time() - began > a.budget_s:
            print(json.dumps({"bench": "decode", "impl": "transformers", "batch": batch,
                              "skipped": "time budget"}), flush=True)
            continue
        ids = torch.randint(0, 50257, (batch, a.context), device="cuda")
        mask = torch.ones_like(ids)

        def run(new_tokens):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False,
                               cache_implementation="static", pad_token_id=50256)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        run(a.warmup + a.steps)  # compiles for this shape
        run(a.warmup + a.steps)
        short = min(run(a.warmup) for _ in range(2))
        long = min(run(a.warmup + a.steps) for _ in range(2))
        step = (long - short) / a.steps
        print(json.dumps({"bench": "decode", "impl": "transformers " + __import__("transformers").__version__,
                          "model": a.geometry + " geometry, random fp16", "batch": batch,
                          "context": a.context, "steps": a.steps, "ms_per_step": 1e3 * step,
                          "tokens_per_second": batch / step}), flush=True)


if __name__ == "__main__":
    main()
