#!/usr/bin/env python3
"""Prefill peer for `kvserve bench engine --max-new-tokens 1`: Hugging Face transformers' one
batched forward of GPT-2's geometry (random fp16 weights, its default attention implementation)
over B prompts of P tokens, no cache kept. Warmed up twice, then the median of --repeats forwards.

Prints one JSON object per case with the prompt tokens/s (B * P / seconds) that `kvserve bench
engine` reports as prompt_throughput.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

GEOMETRIES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
              "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="gpt2", choices=sorted(GEOMETRIES))
    p.add_argument("--cases", default="256x512", help="BxP,...")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    n_layer, n_head, n_embd = GEOMETRIES[a.geometry]
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    model = model.to(torch.float16).cuda().eval()
    for case in a.cases.split(","):
        batch, prompt = map(int, case.split("x"))
        ids = torch.randint(0, 50256, (batch, prompt), device="cuda")
        mask = torch.ones_like(ids)
        seconds = []
        with torch.no_grad():
            for r in range(2 + a.repeats):
                torch.cuda.synchronize()
                began = time.perf_counter()
                model(ids, attention_mask=mask, use_cache=False)
                torch.cuda.synchronize()
                if r >= 2:
                    seconds.append(time.perf_counter() - began)
        median = statistics.median(seconds)
        print(json.dumps({"bench": "prefill", "impl": "transformers " +
                          __import__("transformers").__version__,
                          "attn_implementation": model.config._attn_implementation,
                          "model": a.geometry + " geometry, random fp16", "batch": batch,
                          "prompt_len": prompt, "duration_s": median,
                          "prompt_throughput": batch * prompt / median,
                          "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
