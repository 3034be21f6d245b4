#!/usr/bin/python3
"""Checks client/python/kvserve_client.py against a live server (run by with_live_server.sh).

The Python example must stream exactly the text kvserve-cli streams for the same greedy request,
report the final message, print model info and cache stats, and cancel a request through
its deadline: the server then drops the sequence, so its cache holds none a moment later.
"""

import argparse
import json
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
    parser.add_argument("--addr", required=True)
    parser.add_argument("--client", required=True, help="client/python/kvserve_client.py")
    parser.add_argument("--cli", required=True, help="kvserve-cli")
    args = parser.parse_args()
    client = [sys.executable, args.client, "--addr", args.addr]
    greedy = ["--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0",
              "--ignore-eos"]

    text, err = run(client + ["generate"] + greedy)
    cli_text, cli_err = run([args.cli, "generate", "--addr", args.addr] + greedy)
    if not text or text != cli_text:
        sys.exit(f"Python client streamed {text!r}, kvserve-cli {cli_text!r}")
    final, cli_final = fields(err.strip()), fields(cli_err.strip())
    if final["finish_reason"] != "LENGTH" or final["completion_tokens"] != str(NEW_TOKENS):
        sys.exit(f"unexpected final message: {err}")
    if final["prompt_tokens"] != cli_final["prompt_tokens"]:
        sys.exit(f"prompt tokens differ: {err} vs {cli_err}")
    for key in ("ttft_ms", "e2e_ms", "server_ttft_ms", "server_queue_ms"):
        float(final[key])

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
    print("python client: streamed text equals kvserve-cli's, info and deadline cancellation ok")


if __name__ == "__main__":
    main()
