#!/usr/bin/python3
"""Checks the installed kvserve_client package against a live server (python_client_test.sh).

Its command line must stream exactly the text kvserve-cli streams for the same greedy request
(from text and from --prompt-ids, in both binaries' forms), honour --stop, --top-k/--top-p and
--logprobs, and print model info and cache stats; the library's streaming iterator and its asyncio
variant must give the same text; a deadline must cancel a request, after which the server's cache
holds no sequence.
"""

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time

PROMPT = "The Linux kernel uses"
NEW_TOKENS = 24


def run(argv, expect_rc=0):
    result = subprocess.run(argv, capture_output=True, timeout=60)
    if result.returncode != expect_rc:
        sys.exit(f"{argv} exited {result.returncode}, expected {expect_rc}\n"
                 f"stderr: {result.stderr.decode(errors='replace')}")
    return result.stdout, result.stderr.decode()


def fields(line):
    return dict(item.split("=", 1) for item in line.split())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", required=True, help="the venv's python with kvserve_client")
    parser.add_argument("--addr", required=True)
    parser.add_argument("--cli", required=True, help="kvserve-cli")
    args = parser.parse_args()
    client = [args.python, "-m", "kvserve_client", "--addr", args.addr]
    greedy = ["--max-new-tokens", str(NEW_TOKENS), "--greedy", "--ignore-eos"]

    text, err = run(client + ["generate", "--prompt", PROMPT] + greedy)
    cli_text, cli_err = run([args.cli, "generate", "--addr", args.addr, "--prompt", PROMPT] +
                            greedy)
    if not text or text != cli_text:
        sys.exit(f"Python client streamed {text!r}, kvserve-cli {cli_text!r}")
    final, cli_final = fields(err.strip()), fields(cli_err.strip())
    if final["finish_reason"] != "LENGTH" or final["completion_tokens"] != str(NEW_TOKENS):
        sys.exit(f"unexpected final message: {err}")
    if final["prompt_tokens"] != cli_final["prompt_tokens"]:
        sys.exit(f"prompt tokens differ: {err} vs {cli_err}")
    for key in ("ttft_ms", "e2e_ms", "server_ttft_ms", "server_queue_ms"):
        float(final[key])

    # --prompt-ids in either form, as kvserve-cli takes it.
    ids_text, _ = run(client + ["generate", "--prompt-ids", "464", "7526"] + greedy)
    for form in (["464", "7526"], ["464 7526"], ["464,7526"]):
        other, _ = run([args.cli, "generate", "--addr", args.addr, "--prompt-ids"] + form + greedy)
        if other != ids_text:
            sys.exit(f"--prompt-ids {form}: kvserve-cli {other!r}, Python {ids_text!r}")
    quoted, _ = run(client + ["generate", "--prompt-ids", "464 7526"] + greedy)
    if quoted != ids_text:
        sys.exit(f"--prompt-ids '464 7526' gave {quoted!r}, not {ids_text!r}")

    # --stop ends at a stop string taken from the greedy text; --logprobs prints one per token
    # (a word without spaces, so that the key=value summary stays parseable).
    stop = re.findall(r"[A-Za-z]{3,}", text.decode()[len(text.decode()) // 2:])[0]
    stopped, err = run(client + ["generate", "--prompt", PROMPT, "--stop", stop, "--logprobs"] +
                       greedy)
    summary = fields(err.splitlines()[0])
    if summary["finish_reason"] != "STOP" or stop in stopped.decode():
        sys.exit(f"--stop {stop!r}: {stopped!r}, {err}")
    logprobs = err.splitlines()[1].split()[1:]
    if len(logprobs) != int(summary["completion_tokens"]) or not all(
            float(p.split(":")[1]) <= 0 for p in logprobs):
        sys.exit(f"--logprobs: {err}")
    sampled, err = run(client + ["generate", "--prompt", PROMPT, "--max-new-tokens", "8",
                                 "--temperature", "1", "--top-k", "5", "--top-p", "0.9",
                                 "--seed", "7"])
    again, _ = run(client + ["generate", "--prompt", PROMPT, "--max-new-tokens", "8",
                             "--temperature", "1", "--top-k", "5", "--top-p", "0.9", "--seed", "7"])
    if sampled != again or fields(err.strip())["completion_tokens"] == "0":
        sys.exit(f"seeded top-k/top-p sampling: {sampled!r} then {again!r}")
    _, err = run(client + ["generate", "--prompt-ids", "1", "x"], expect_rc=2)
    if "'x' is not a token id" not in err:
        sys.exit(f"a bad id: {err}")

    # The library: the streaming iterator and the asyncio client give the same text.
    from kvserve_client import AsyncClient, Client, GenerateFinal, TokenChunk
    with Client(args.addr) as library:
        stream = library.generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0,
                                  ignore_eos=True)
        chunks = list(stream)
        if not all(isinstance(c, TokenChunk) for c in chunks):
            sys.exit(f"the stream yielded {chunks!r}")
        if "".join(c.text for c in chunks).encode() != text:
            sys.exit("Client.generate streamed other text than the command line")
        if not isinstance(stream.final, GenerateFinal) or stream.final.completion_tokens != \
                NEW_TOKENS:
            sys.exit(f"Client.generate final: {stream.final}")
        if library.model_info()["architecture"] != "gpt2":
            sys.exit("Client.model_info")

    async def async_text():
        async with AsyncClient(args.addr) as aio:
            stream = aio.generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0,
                                  ignore_eos=True)
            collected = await stream.text()
            return collected, stream.final, (await aio.cache_stats())["blocks_total"]

    aio_text, aio_final, blocks = asyncio.run(async_text())
    if aio_text.encode() != text or aio_final.finish_reason != "LENGTH" or int(blocks) <= 0:
        sys.exit(f"AsyncClient: {aio_text!r}, {aio_final}, {blocks}")

    out, _ = run(client + ["info"])
    info = json.loads(out)
    if info["model"]["architecture"] != "gpt2":
        sys.exit(f"unexpected info: {out}")
    if int(info["cache"]["blocks_total"]) <= 0:
        sys.exit(f"the cache reports no blocks: {out}")

    # 1000 tokens take seconds on the CPU backend; the deadline passes long before.
    _, err = run(client + ["generate", "--prompt", PROMPT, "--max-new-tokens", "1000",
                           "--ignore-eos", "--timeout-s", "0.2"], expect_rc=1)
    if "generate failed: DEADLINE_EXCEEDED" not in err:
        sys.exit(f"expected DEADLINE_EXCEEDED, got: {err}")
    for _ in range(100):
        out, _ = run(client + ["info"])
        if int(json.loads(out)["cache"]["sequences"]) == 0:
            break
        time.sleep(0.1)
    else:
        sys.exit(f"the cancelled request still holds the cache 10 s later: {out}")
    print("python client: command line, library and asyncio streams equal kvserve-cli's; "
          "flags, info and deadline cancellation ok")


if __name__ == "__main__":
    main()
