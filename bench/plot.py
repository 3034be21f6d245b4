#!/usr/bin/python3
"""Draws the charts of docs/benchmarks.md from the committed benchmark results.

Usage: bench/plot.py [--docs DOCS] [--out OUT]    (defaults: docs, docs/plots)

Reads DOCS/memory.json (kvserve bench memory), DOCS/quality/summary.json (bench/quality.sh),
DOCS/bench/latency.json (bench/latency.sh) and the GPU_DECODE file below (kvserve bench decode
and bench/hf_decode.py on one H100, scripts/gpu-check.sh run --bench), writes one PNG per chart into OUT and prints each path. Needs only Debian's python3-matplotlib; the Agg backend draws without a display.
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib.ticker import LogLocator, ScalarFormatter  # noqa: E402

# kvserve bench decode and the transformers baseline measured in the same call (one H100,
# docs/gpu.md, "Tenth session", call e): (title, file, context spread) per line style, solid
# then dashed. The file holds the batch sweep with every sequence at context 512 (spread 1) and
# again with contexts spread over 32 tokens (--context-spread 32: some KIVI sequences flush at
# every step); the baseline (equal contexts) is drawn once.
GPU_DECODE = [("0a2096c, equal contexts", "gpu/main-2026-12-07-h100-m-bench.jsonl", 1),
              ("0a2096c, contexts 512-543", "gpu/main-2026-12-07-h100-m-bench.jsonl", 32)]
# One colour per KV format in every chart, so a format reads the same everywhere.
COLOURS = {"fp16": "tab:blue", "int8": "tab:orange", "kivi4": "tab:green", "kivi2": "tab:red",
           "kivi2-gv64": "tab:purple", "kivi2-per-token-keys": "tab:brown",
           "kivi2-gv64-p8": "tab:pink", "kivi2-gv64-res8": "tab:cyan", "kivi2c": "tab:olive",
           "transformers": "tab:gray"}
LABELS = {"kivi2-gv64": "kivi2 GV64", "kivi2-per-token-keys": "kivi2, keys per token",
          "kivi2-gv64-p8": "kivi2 GV64 fp8 params", "kivi2-gv64-res8": "kivi2 GV64 int8 residual"}


def label(name):
    return LABELS.get(name, name)


def save(fig, out, name):
    path = out / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(path)


def plot_memory(docs, out):
    results = json.loads((docs / "memory.json").read_text())["results"]
    models = list(dict.fromkeys(r["model"] for r in results))

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in results if r["model"] == model):
            tokens = [point["tokens"] for point in r["lengths"]]
            kib = [point["bytes_per_token"] / 1024 for point in r["lengths"]]
            ax.plot(tokens, kib, marker="o", color=COLOURS[r["format"]], label=label(r["format"]))
        ax.set_title(model.removeprefix("dummy:"))
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("KV bytes per token (KiB, every pool byte)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("KV cache bytes per token (kvserve bench memory)")
    save(fig, out, "memory-bytes-per-token.png")

    # The ratio depends on the format and length only (every GPT-2 size has 64-wide heads), so
    # GPT-2 small stands for all; the pool capacity differs by model through page rounding.
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in (r for r in results if r["model"] == models[0]):
        tokens = [point["tokens"] for point in r["lengths"]]
        left.plot(tokens, [point["compression_ratio"] for point in r["lengths"]], marker="o",
                  color=COLOURS[r["format"]], label=label(r["format"]))
    left.set_xscale("log", base=2)
    left.set_xticks(tokens, [str(t) for t in tokens])
    left.set_xlabel("sequence length (tokens)")
    left.set_ylabel("compression vs fp16 (x)")
    left.set_title("compression ratio (any GPT-2 size)")
    left.grid(alpha=0.3)
    left.legend()
    formats = list(dict.fromkeys(r["format"] for r in results))
    width = 0.8 / len(formats)
    for i, fmt in enumerate(formats):
        rows = [next(r for r in results if r["model"] == m and r["format"] == fmt) for m in models]
        bars = right.bar([m + (i - (len(formats) - 1) / 2) * width for m in range(len(models))],
                         [r["sequences_of_1024_in_pool"] for r in rows], width,
                         color=COLOURS[fmt], label=label(fmt))
        right.bar_label(bars, fontsize=7)
    right.set_xticks(range(len(models)), [m.removeprefix("dummy:") for m in models])
    right.set_ylabel("sequences")
    right.set_title(f"1024-token sequences a {results[0]['pool_mb']} MiB pool holds")
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)
    save(fig, out, "memory-compression.png")


def plot_quality(docs, out):
    summary = json.loads((docs / "quality/summary.json").read_text())
    names = list(summary)
    deltas = [summary[n]["delta_vs_fp16_percent"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar([label(n) for n in names], deltas, color=[COLOURS[n] for n in names])
    ax.bar_label(bars, labels=[f"{d:+.3f}%" for d in deltas], fontsize=8)
    ax.set_ylabel("perplexity vs fp16 (%)")
    fp16 = summary["fp16"]
    ax.set_title(f"Perplexity cost of each KV format (fp16: {fp16['ppl']:.4f}; "
                 f"{fp16['windows']} windows, {fp16['tokens']:,} tokens)")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    save(fig, out, "quality-ppl-delta.png")


def plot_latency(docs, out):
    bench = json.loads((docs / "bench/latency.json").read_text())
    runs = bench["runs"]
    formats = list(dict.fromkeys(run["kv"] for run in runs))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for fmt in formats:
        points = sorted((run for run in runs if run["kv"] == fmt and run["sweep"] == "rate"),
                        key=lambda run: run["rate"])
        rates = [run["rate"] for run in points]
        for ax, metric in zip(axes, ("ttft", "itl", "e2el")):
            for pct, style in (("p50", "-"), ("p99", "--")):
                ax.plot(rates, [run["result"][f"{pct}_{metric}_ms"] for run in points],
                        style, marker="o", color=COLOURS[fmt], label=f"{fmt} {pct}")
    for ax, title in zip(axes, ("time to first token", "inter-token latency",
                                "end-to-end latency")):
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel("ms (log scale)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        # Labelled minor ticks, 1.5 included, so a value between two powers of ten can be read.
        ax.yaxis.set_minor_locator(LogLocator(subs=(1.5, 2, 3, 4, 5, 6, 7, 8, 9)))
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0.0))
    model = pathlib.Path(bench["model"]).name
    fig.suptitle(f"CPU server latency under load ({model}, {bench['machine']['cores']} cores, "
                 f"at most {bench['rate_sweep_concurrency']} streams in flight)")
    save(fig, out, "latency-vs-rate.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for fmt in formats:
        points = sorted((run for run in runs if run["kv"] == fmt and run["sweep"] == "concurrency"),
                        key=lambda run: run["concurrency"])
        concurrency = [run["concurrency"] for run in points]
        left.plot(concurrency, [run["result"]["output_throughput"] for run in points],
                  marker="o", color=COLOURS[fmt], label=fmt)
        for pct, style in (("p50", "-"), ("p99", "--")):
            right.plot(concurrency, [run["result"][f"{pct}_tpot_ms"] for run in points], style,
                       marker="o", color=COLOURS[fmt], label=f"{fmt} {pct}")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.set_xlabel("concurrent streams (closed loop)")
        ax.grid(alpha=0.3)
        ax.legend()
    left.set_ylabel("output tokens/s")
    left.set_ylim(bottom=0)
    right.set_ylabel("time per output token (ms)")
    right.set_ylim(bottom=0)
    fig.suptitle(f"CPU server throughput vs concurrency ({model}, "
                 f"{bench['machine']['cores']} cores)")
    save(fig, out, "latency-vs-concurrency.png")


def plot_gpu_decode(docs, out):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (title, name, spread), style in zip(GPU_DECODE, ("-", "--")):
        rows = [json.loads(line) for line in (docs / name).read_text().splitlines() if line]
        # Only the batch sweep at context 512 (the same files hold roofline rows at other contexts)
        # with CUDA graphs (the files also hold fp16 rows without) and this line's spread (the
        # baseline's rows have none). The kivi2c preset's rows carry kv "kivi2" (the format) and
        # its configuration.
        rows = [row for row in rows if row["context"] == 512 and row.get("cuda_graphs", True)
                and row.get("context_spread", spread) == spread]
        for row in rows:
            if "int8 residual" in row.get("kv_config", ""):
                row["kv"] = "kivi2c"
        baseline = {row["batch"]: row["tokens_per_second"] for row in rows if "impl" in row}
        batches = sorted(baseline)
        if style == "-":
            left.plot(batches, [baseline[b] for b in batches], style, marker="o",
                      color=COLOURS["transformers"], label="transformers (equal contexts)")
        # kivi2c's rows only in the files of calls that ran it.
        for kv in (kv for kv in ("fp16", "kivi2", "kivi2c") if any(row.get("kv") == kv
                                                                   for row in rows)):
            speed = {row["batch"]: row["tokens_per_second"] for row in rows if row.get("kv") == kv}
            left.plot(batches, [speed[b] for b in batches], style, marker="o", color=COLOURS[kv],
                      label=f"kvserve {kv}, {title}")
            right.plot(batches, [speed[b] / baseline[b] for b in batches], style, marker="o",
                       color=COLOURS[kv], label=f"kvserve {kv}, {title}")
    for kv, target in (("fp16", 2), ("kivi2", 4)):
        right.plot([batches[-1]], [target], marker="*", markersize=14, linestyle="none",
                   color=COLOURS[kv], label=f"{kv} target at batch {batches[-1]}: {target}x")
    right.axhline(1, color=COLOURS["transformers"], linewidth=1)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch (sequences decoding together)")
        ax.grid(alpha=0.3, which="both")
    left.set_yscale("log")
    left.set_ylabel("decode tokens/s")
    left.set_title("throughput (transformers: fp16, static cache, same call)")
    left.legend(fontsize=7)
    right.set_ylabel("kvserve / transformers tokens/s (x)")
    right.set_ylim(bottom=0)
    right.set_title("speed-up over the baseline of the same call")
    right.legend(fontsize=7)
    fig.suptitle("GPU decode, GPT-2 small geometry, context 512, one H100")
    save(fig, out, "gpu-decode.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=pathlib.Path, default=pathlib.Path("docs"),
                        help="where the results are (default: docs)")
    parser.add_argument("--out", type=pathlib.Path, help="where the PNGs go (default: DOCS/plots)")
    args = parser.parse_args()
    out = args.out or args.docs / "plots"
    out.mkdir(parents=True, exist_ok=True)
    plot_memory(args.docs, out)
    plot_quality(args.docs, out)
    plot_latency(args.docs, out)
    plot_gpu_decode(args.docs, out)


if __name__ == "__main__":
    main()
