#!/usr/bin/python3
"""A Python client of kvserve's gRPC API: the example to start from.

Needs Debian's python3-grpcio and python3-protobuf, and the stubs the build generates from
proto/ (scripts/build.sh writes them to build/proto/python/):

    export PYTHONPATH=build/proto/python
    client/python/kvserve_client.py --addr localhost:50051 generate --prompt "The kernel" \
        --max-new-tokens 32 --temperature 0
    client/python/kvserve_client.py --addr localhost:50051 info
    client/python/kvserve_client.py --addr localhost:50051 generate --prompt "The kernel" \
        --max-new-tokens 1000 --timeout-s 0.2      # the deadline cancels the request mid-stream

generate writes the completion to stdout as each chunk arrives (the text only, byte for byte as
`kvserve-cli generate` does), then one key=value line on stderr: finish reason, token counts and
latencies. info prints GetModelInfo and GetCacheStats as one JSON object.
An RPC error (including a passed deadline) prints `kvserve_client: WHAT failed: CODE: details`
on stderr and exits 1.
"""

import argparse
import json
import sys
import time

import grpc
from google.protobuf import json_format

try:
    from kvserve.v1 import generation_pb2, generation_pb2_grpc
except ImportError as error:
    sys.exit(f"kvserve_client: {error}: build the stubs (scripts/build.sh) and set "
             "PYTHONPATH=build/proto/python")


def generate(stub, args):
    request = generation_pb2.GenerateRequest(prompt=args.prompt)
    # Only the flags given are set, so the server's defaults (docs/design.md section 5) apply to
    # the rest: proto3 `optional` fields carry presence, and an unset one is not the same as 0.
    if args.max_new_tokens is not None:
        request.stopping.max_new_tokens = args.max_new_tokens
    if args.temperature is not None:
        request.sampling.temperature = args.temperature
    if args.seed is not None:
        request.sampling.seed = args.seed
    request.stopping.ignore_eos = args.ignore_eos

    out = sys.stdout.buffer  # the server's text is UTF-8 already; write it whatever the locale
    start = time.monotonic()
    first_chunk = None
    final = None
    # The call is an iterator of responses; with a timeout, gRPC cancels the call when the
    # deadline passes and the server drops the request from its batch at the next step.
    responses = stub.Generate(request, timeout=args.timeout_s)
    for response in responses:
        if response.HasField("chunk"):
            first_chunk = first_chunk or time.monotonic()
            out.write(response.chunk.text.encode())
            out.flush()
        else:
            final = response.final
    end = time.monotonic()
    if out.isatty():  # the text has no newline of its own; the summary wants its own line
        out.write(b"\n")
        out.flush()
    if final is None:
        raise RuntimeError("the stream ended without its final message")

    reason = generation_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_")
    fields = [f"finish_reason={reason}"]
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


def info(stub, args):
    model = stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=args.timeout_s)
    cache = stub.GetCacheStats(generation_pb2.GetCacheStatsRequest(), timeout=args.timeout_s)

    def as_dict(message):
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         including_default_value_fields=True)

    print(json.dumps({"model": as_dict(model), "cache": as_dict(cache)}, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="localhost:50051", help="the server, HOST:PORT")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream one completion to stdout")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, help="server default: 16")
    gen.add_argument("--temperature", type=float, help="0 means greedy; server default: 1")
    gen.add_argument("--seed", type=int, help="sampling seed; server default: 0")
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-text")
    gen.add_argument("--timeout-s", type=float, help="deadline of the whole call (default: none)")
    inf = commands.add_parser("info", help="model info and cache stats as JSON")
    inf.add_argument("--timeout-s", type=float, default=10, help="deadline of each call")
    args = parser.parse_args()

    with grpc.insecure_channel(args.addr) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            if args.command == "generate":
                generate(stub, args)
            else:
                info(stub, args)
        except grpc.RpcError as error:
            print(f"kvserve_client: {args.command} failed: {error.code().name}: {error.details()}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
