"""kvserve-client (python3 -m kvserve_client): the command line of the Python client.

generate writes the completion to stdout as each chunk arrives (the text only, byte for byte as
`kvserve-cli generate` does), then one key=value line on stderr: finish reason, token counts and
latencies (and, with --logprobs, a line of id:logprob pairs). info prints GetModelInfo and
GetCacheStats as one JSON object. Exit status: 0, 1 when the call failed (the reason on stderr:
`kvserve-client: WHAT failed: CODE: details`), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import List, Optional, Sequence

import grpc

from kvserve_client.client import Client

UNSET = "the server's"


def token_ids(arguments: Sequence[str]) -> List[int]:
    """`--prompt-ids 464 318`, `--prompt-ids "464 318"` or `464,318`, as kvserve-cli takes them."""
    ids = []
    for word in re.split(r"[\s,]+", " ".join(arguments).strip()):
        if not word.isdigit():
            raise argparse.ArgumentTypeError(f"--prompt-ids: '{word}' is not a token id")
        ids.append(int(word))
    return ids


def generate(client: Client, args: argparse.Namespace) -> None:
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    stream = client.generate(
        prompt, max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos, logprobs=args.logprobs,
        timeout_s=args.timeout_s)
    out = sys.stdout.buffer  # the server's text is UTF-8 already; write it whatever the locale
    start = time.monotonic()
    first_chunk: Optional[float] = None
    pairs = []
    for chunk in stream:
        first_chunk = first_chunk or time.monotonic()
        out.write(chunk.text.encode())
        out.flush()
        pairs += [f"{i}:{p}" for i, p in zip(chunk.token_ids, chunk.logprobs)]
    end = time.monotonic()
    if out.isatty():  # the text has no newline of its own; the summary wants its own line
        out.write(b"\n")
        out.flush()
    final = stream.final
    assert final is not None  # the stream raises ProtocolError otherwise
    fields = [f"finish_reason={final.finish_reason}"]
    if final.matched_stop:
        fields.append(f"matched_stop={final.matched_stop}")
    fields += [f"prompt_tokens={final.prompt_tokens}",
               f"completion_tokens={final.completion_tokens}"]
    if first_chunk is not None:
        fields.append(f"ttft_ms={1e3 * (first_chunk - start):.3f}")
    fields += [f"e2e_ms={1e3 * (end - start):.3f}",
               f"server_ttft_ms={1e3 * final.time_to_first_token_seconds:.3f}",
               f"server_queue_ms={1e3 * final.queue_seconds:.3f}"]
    print(" ".join(fields), file=sys.stderr)
    if args.logprobs:
        print("logprobs: " + " ".join(pairs), file=sys.stderr)


def info(client: Client, args: argparse.Namespace) -> None:
    print(json.dumps({"model": client.model_info(args.timeout_s),
                      "cache": client.cache_stats(args.timeout_s)}, indent=2))


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, but no "(default: None)" for settings left to the server."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    formatter = DefaultsFormatter
    root = argparse.ArgumentParser(prog="kvserve-client", description=__doc__.split("\n\n")[0],
                                   formatter_class=formatter)
    root.add_argument("--addr", default="localhost:50051", help="the server, HOST:PORT")
    root.add_argument("--tls-ca", help="PEM CA bundle: connect over TLS and verify the server")
    root.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS")
    root.add_argument("--tls-key", help="PEM private key of --tls-cert")
    commands = root.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream one completion to stdout",
                              formatter_class=formatter)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", nargs="+", metavar="ID",
                        help="prompt as token ids: 464 318, or one quoted argument")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")
    sampling = gen.add_mutually_exclusive_group()
    sampling.add_argument("--temperature", type=float, help="0 means greedy")
    sampling.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    gen.add_argument("--top-k", type=int, help="0: off")
    gen.add_argument("--top-p", type=float, help="1: off")
    gen.add_argument("--repetition-penalty", type=float, help="1: off")
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    gen.add_argument("--stop-token-id", action="append", type=int, default=[],
                     help="a stop token id (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-text")
    gen.add_argument("--logprobs", action="store_true",
                     help="print each token's log-probability on stderr")
    gen.add_argument("--timeout-s", type=float, help="deadline of the whole call (none when unset)")
    # Unset sampling and stopping settings take the server's defaults; --help says so.
    for action in gen._actions:
        if action.dest in ("max_new_tokens", "temperature", "top_k", "top_p",
                           "repetition_penalty", "seed", "timeout_s"):
            action.help += f" (default: {UNSET})" if action.dest != "timeout_s" else ""
    inf = commands.add_parser("info", help="model info and cache stats as JSON",
                              formatter_class=formatter)
    inf.add_argument("--timeout-s", type=float, default=10, help="deadline of each call")
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
    root = parser()
    args = root.parse_args(argv)
    if args.command == "generate" and args.prompt_ids is not None:
        try:
            args.prompt_ids = token_ids(args.prompt_ids)
        except argparse.ArgumentTypeError as error:
            root.error(str(error))
    try:
        with Client(args.addr, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                    tls_key=args.tls_key) as client:
            if args.command == "generate":
                generate(client, args)
            else:
                info(client, args)
    except ValueError as error:
        root.error(str(error))
    except grpc.RpcError as error:
        print(f"kvserve-client: {args.command} failed: {error.code().name}: {error.details()}",
              file=sys.stderr)
        return 1
    return 0
