#!/usr/bin/env python3
"""End-to-end peer for `kvserve bench engine`: Hugging Face transformers' plain batch generate()
of GPT-2's geometry (random fp16 weights) with the static cache, compiled and warmed up on the
exact timed shape, greedy, every sequence forced to the full N new tokens.

One case is B sequences of P prompt tokens + N new tokens, all at once: what a user gets from
`model.generate(batch)` without a serving engine. Prints one JSON object per case, with the output
tokens/s (B * N / wall time, prefill included) that `kvserve bench engine` reports as
output_throughput, and the copy bandwidth of the card first (the roofline's denominator).
"""
import argparse
import json
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

GEOMETRIES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
              "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}


def copy_bandwidth():
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / 10
    return 2 * src.numel() / seconds  # bytes read + written per second


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="gpt2", choices=sorted(GEOMETRIES))
    p.add_argument("--cases", default="256x512x128", help="BxPxN,...")
    p.add_argument("--no-compile", action="store_true", help="dynamic cache, eager")
    a = p.parse_args()
    torch.manual_seed(0)
    print(json.dumps({"bench": "copy_bandwidth", "bytes_per_second": copy_bandwidth(),
                      "device": torch.cuda.get_device_name()}), flush=True)
    n_layer, n_head, n_embd = GEOMETRIES[a.geometry]
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    model = model.to(torch.float16).cuda().eval()
    extra = {} if a.no_compile else {"cache_implementation": "static"}
    for case in a.cases.split(","):
        batch, prompt, new = map(int, case.split("x"))
        ids = torch.randint(0, 50256, (batch, prompt), device="cuda")
        mask = torch.ones_like(ids)

        def generate():
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=50256,
                                      **extra)

        generate()  # compiles for this shape
        generate()
        torch.cuda.synchronize()
        began = time.perf_counter()
        out = generate()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        assert out.shape == (batch, prompt + new)
        print(json.dumps({"bench": "generate", "impl": "transformers " +
                          __import__("transformers").__version__,
                          "model": a.geometry + " geometry, random fp16",
                          "compiled_static_cache": not a.no_compile, "batch": batch,
                          "prompt_len": prompt, "max_new_tokens": new, "duration_s": seconds,
                          "output_throughput": batch * new / seconds,
                          "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
