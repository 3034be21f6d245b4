#!/usr/bin/env python3
"""Makes the reference fixtures that kvserve's CPU tests compare against.

Runs on the GPU machine (PyTorch + transformers + tiktoken; no network needed):

    python3 tests/reference/make_reference.py --model DIR --text docs-val.txt.xz --out DIR

Writes into --out:
  tokenizer_docs.ids.xz  one line per document of the evaluation text: its GPT-2 token ids
  tokenizer_edge.json    edge-case strings and their ids
  logits.json.xz         test prompts, 64-token greedy continuations and logits (a strided vocab
                         sample plus the top 8) at every position, for each KV format
  ppl.json               perplexity of transformers itself and of a PyTorch simulation of every
                         KV format on the first --windows windows (the semantics of
                         docs/design.md section 3)

The simulation mirrors the cache semantics exactly: query t attends to key/value j through its
quantized form when j lies in a group that the cache has already quantized after t+1 tokens, and
through its fp16-rounded form otherwise (the residual window). Every format's codes are computed
from the fp16-rounded activations with fp16 scales and zero points, as the engine stores them.
"""
import argparse
import json
import lzma
import math
import os

import torch
import transformers

EOT = 50256
SEPARATOR = "\n<|endoftext|>\n"

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The Linux kernel uses a slab allocator to",
    "\u00dcberpr\u00fcfung der \u00c4nderungen \u2014 na\u00efve caf\u00e9 \U0001F680 and then",
]

EDGE_CASES = [
    "", " ", "  ", "   x", "\n", "\r\n", "a\r\nb\r\n\r\n", "\t\tindent", "trailing spaces   ",
    "Hello, world!", "I'm you're he's we'll they've I'd don't", "'s 's'S 'LL",
    "12345 678 9 0.5 1,000,000 3.14159", "x=1;y=22;z=333", "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "emoji \U0001F680\U0001F525 \U0001F468\u200d\U0001F469\u200d\U0001F467 flags \U0001F1E9\U0001F1EA",
    "\u00a0non-breaking\u00a0space", "\u2028line\u2029separators", "mixed   \n\n  whitespace \t\n x",
    "<|endoftext|> is text here", "    def f():\n        return 1\n", "\u0660\u0661\u0662 arabic digits",
    "\u2160\u2161 roman \u00bd fraction \u00b2 superscript", "combining e\u0301 accents",
    "ALL CAPS AND lower", "a" * 300, " ".join(["word"] * 50), "\U00010348 gothic \U0001D400 math",
]

FORMATS = {
    "fp16": dict(kind="fp16"),
    "int8": dict(kind="int8"),
    "kivi4": dict(kind="kivi", bits=4, group=32, value_group=32, residual=32),
    "kivi2": dict(kind="kivi", bits=2, group=32, value_group=32, residual=32),
    "kivi2_gv64": dict(kind="kivi", bits=2, group=32, value_group=64, residual=32),
    "kivi2_per_token_keys": dict(kind="kivi", bits=2, group=32, value_group=32, residual=32,
                                 per_token_keys=True),
}


def read_text(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return f.read()


def quantize(x, bits, dim, group):
    """Asymmetric round-to-nearest along `dim` in groups of `group`; fp16 scale and zero point.

    x: fp32 tensor holding fp16-representable values; returns the dequantized fp32 tensor.
    """
    x = x.movedim(dim, -1)
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    lo = g.amin(-1, keepdim=True)
    hi = g.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).half().float()
    zero = lo.half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((g - zero) / safe), 0, 2**bits - 1)
    codes = torch.where(scale > 0, codes, torch.zeros_like(codes))
    return (codes * scale + zero).reshape(shape).movedim(-1, dim)


def quantized_length(n, fmt):
    """Tokens of a sequence of length n that the cache holds quantized (docs/design.md sec. 3)."""
    if fmt["kind"] == "fp16":
        return 0
    if fmt["kind"] == "int8":
        return n
    r, g = fmt["residual"], fmt["group"]
    return 0 if n < r + g else g * ((n - r) // g)


def cache_view(k16, v16, fmt):
    """k16, v16: [B, H, T, D] fp16-rounded. Returns quantized k, v (same shape) and the mask
    [T, T] that is True where query t reads key j through its quantized form."""
    T = k16.shape[2]
    if fmt["kind"] == "fp16":
        return k16, v16, torch.zeros(T, T, dtype=torch.bool, device=k16.device)
    if fmt["kind"] == "int8":
        kq = quantize(k16, 8, 3, k16.shape[3])
        vq = quantize(v16, 8, 3, v16.shape[3])
    else:
        bits, g = fmt["bits"], fmt["group"]
        full = (T // g) * g
        kq = k16.clone()
        if fmt.get("per_token_keys"):
            kq = quantize(k16, bits, 3, fmt["value_group"])
        elif full:
            kq[:, :, :full] = quantize(k16[:, :, :full], bits, 2, g)
        vq = quantize(v16, bits, 3, fmt["value_group"])
    qlen = torch.tensor([quantized_length(t + 1, fmt) for t in range(T)], device=k16.device)
    mask = torch.arange(T, device=k16.device)[None, :] < qlen[:, None]
    return kq, vq, mask


class Gpt2Reference:
    """GPT-2 forward in fp32 whose attention reads K/V the way the engine's cache holds them."""

    def __init__(self, model):
        self.cfg = model.config
        self.sd = {k: v.float() for k, v in model.state_dict().items()}

    def w(self, name):
        return self.sd["transformer." + name]

    def logits(self, ids, fmt):
        cfg = self.cfg
        B, T = ids.shape
        H, C = cfg.n_head, cfg.n_embd
        D = C // H
        eps = cfg.layer_norm_epsilon
        pos = torch.arange(T, device=ids.device)
        x = self.w("wte.weight")[ids] + self.w("wpe.weight")[pos][None]
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        for layer in range(cfg.n_layer):
            p = f"h.{layer}."
            h = torch.nn.functional.layer_norm(x, (C,), self.w(p + "ln_1.weight"), self.w(p + "ln_1.bias"), eps)
            qkv = h @ self.w(p + "attn.c_attn.weight") + self.w(p + "attn.c_attn.bias")
            q, k, v = qkv.split(C, dim=2)
            q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
            k16, v16 = k.half().float(), v.half().float()
            kq, vq, quant_mask = cache_view(k16, v16, fmt)
            scores = torch.where(quant_mask, q @ kq.transpose(-1, -2), q @ k16.transpose(-1, -2))
            scores = scores / math.sqrt(D)
            scores = scores.masked_fill(~causal, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            att = (probs * quant_mask) @ vq + (probs * ~quant_mask) @ v16
            att = att.transpose(1, 2).reshape(B, T, C)
            x = x + att @ self.w(p + "attn.c_proj.weight") + self.w(p + "attn.c_proj.bias")
            h = torch.nn.functional.layer_norm(x, (C,), self.w(p + "ln_2.weight"), self.w(p + "ln_2.bias"), eps)
            h = h @ self.w(p + "mlp.c_fc.weight") + self.w(p + "mlp.c_fc.bias")
            h = torch.nn.functional.gelu(h, approximate="tanh")
            x = x + h @ self.w(p + "mlp.c_proj.weight") + self.w(p + "mlp.c_proj.bias")
        x = torch.nn.functional.layer_norm(x, (C,), self.w("ln_f.weight"), self.w("ln_f.bias"), eps)
        return x @ self.w("wte.weight").T


def window_ids(docs, tokenizer, windows, seq):
    ids = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(EOT)
        if len(ids) >= windows * seq:
            break
    assert len(ids) >= windows * seq, "not enough text for the requested windows"
    return torch.tensor(ids[: windows * seq]).view(windows, seq)


def nll_of(logits, ids):
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def summary(nll_sum, count):
    return {"nll": nll_sum / count, "ppl": math.exp(nll_sum / count), "tokens": count}


def sample_logits(row, stride):
    top = torch.topk(row, 8)
    return {
        "strided": [round(float(v), 5) for v in row[::stride]],
        "top_ids": top.indices.tolist(),
        "top_values": [round(float(v), 5) for v in top.values],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--vocab-stride", type=int, default=499)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    fast = transformers.GPT2TokenizerFast(os.path.join(args.model, "vocab.json"), os.path.join(args.model, "merges.txt"))
    slow = transformers.GPT2Tokenizer(os.path.join(args.model, "vocab.json"), os.path.join(args.model, "merges.txt"))
    text = read_text(args.text)
    docs = text.split(SEPARATOR)
    mismatches = 0
    lines = []
    for doc in docs:
        a = fast.encode(doc)
        if slow.encode(doc) != a:
            mismatches += 1
        assert fast.decode(a) == doc
        lines.append(" ".join(map(str, a)))
    print(f"docs: {len(docs)}, tokens: {sum(len(l.split()) for l in lines)}, slow/fast mismatches: {mismatches}")
    with lzma.open(os.path.join(args.out, "tokenizer_docs.ids.xz"), "wt") as f:
        f.write("\n".join(lines) + "\n")
    edge = []
    for s in EDGE_CASES:
        ids = fast.encode(s)
        assert slow.encode(s) == ids, f"slow and fast tokenizers disagree on {s!r}"
        edge.append({"text": s, "ids": ids})
    with open(os.path.join(args.out, "tokenizer_edge.json"), "w") as f:
        json.dump({"source": f"transformers {transformers.__version__} GPT2TokenizerFast == GPT2Tokenizer",
                   "cases": edge}, f, ensure_ascii=True, indent=1)

    hf = transformers.GPT2LMHeadModel.from_pretrained(args.model, dtype=torch.float32).to(dev).eval()
    ref = Gpt2Reference(hf)

    with torch.no_grad():
        prompts_out = []
        prompt_texts = PROMPTS + [docs[0][:700]]
        for text_p in prompt_texts:
            pids = fast.encode(text_p)
            seq = torch.tensor([pids], device=dev)
            for _ in range(args.new_tokens):
                nxt = ref.logits(seq, FORMATS["fp16"])[0, -1].argmax()
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            hf_gen = hf.generate(torch.tensor([pids], device=dev), max_new_tokens=args.new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(pids), dtype=torch.long, device=dev),
                                 pad_token_id=EOT)
            full = seq[0].tolist()
            hf_logits = hf(seq).logits[0]
            entry = {"text": text_p, "prompt_ids": pids, "greedy_ids": full[len(pids):],
                     "transformers_greedy_ids": hf_gen[0, len(pids):].tolist(), "formats": {}}
            for name, fmt in FORMATS.items():
                lg = ref.logits(seq, fmt)[0]
                if name == "fp16":
                    entry["max_abs_diff_fp16_view_vs_transformers"] = float((lg - hf_logits).abs().max())
                entry["formats"][name] = [sample_logits(lg[t], args.vocab_stride) for t in range(lg.shape[0])]
            prompts_out.append(entry)
            print(f"prompt {len(pids)} tokens: greedy equal to transformers: "
                  f"{entry['greedy_ids'] == entry['transformers_greedy_ids']}, "
                  f"fp16-view vs transformers max |dlogit| {entry['max_abs_diff_fp16_view_vs_transformers']:.2e}")
        with lzma.open(os.path.join(args.out, "logits.json.xz"), "wt") as f:
            json.dump({"vocab_stride": args.vocab_stride, "new_tokens": args.new_tokens,
                       "formats": FORMATS, "prompts": prompts_out}, f)

        ids = window_ids(docs, fast, args.windows, args.seq).to(dev)
        hf16 = transformers.GPT2LMHeadModel.from_pretrained(args.model, dtype=torch.float16).to(dev).eval()
        totals = {"transformers_fp32": 0.0, "transformers_fp16": 0.0, **{n: 0.0 for n in FORMATS}}
        per_window = {n: [] for n in totals}
        for start in range(0, args.windows, 8):
            chunk = ids[start:start + 8]
            results = {"transformers_fp32": hf(chunk).logits, "transformers_fp16": hf16(chunk).logits.float()}
            for name, fmt in FORMATS.items():
                results[name] = ref.logits(chunk, fmt)
            for name, lg in results.items():
                nll = nll_of(lg, chunk)
                totals[name] += float(nll.sum())
                per_window[name].extend(float(v) for v in nll.mean(dim=1))
        count = args.windows * (args.seq - 1)
        report = {"windows": args.windows, "seq": args.seq, "formats": FORMATS,
                  "ppl": {n: summary(t, count) for n, t in totals.items()},
                  "per_window_mean_nll": per_window,
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "gpu": torch.cuda.get_device_name()}
        base = report["ppl"]["fp16"]["ppl"]
        for n, s in report["ppl"].items():
            print(f"{n:24s} ppl {s['ppl']:.5f}  vs fp16 view {100 * (s['ppl'] / base - 1):+.3f}%")
        with open(os.path.join(args.out, "ppl.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
