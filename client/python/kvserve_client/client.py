"""Synchronous and asyncio clients of kvserve.v1.Generation, with typed results."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, AsyncIterator, Dict, Iterator, Optional, Sequence, Union

import grpc
from google.protobuf import json_format

from kvserve_client._pb import generation_pb2, generation_pb2_grpc

Prompt = Union[str, Sequence[int]]


class ProtocolError(RuntimeError):
    """The server broke the API's contract (e.g. a stream without its final message)."""


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files: ``ca`` verifies the server (TLS); ``cert`` and ``key`` identify this client to a
    server that asks for mutual TLS."""

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None

    def credentials(self) -> Optional[grpc.ChannelCredentials]:
        if not self.ca:
            if self.cert or self.key:
                raise ValueError("a client certificate needs the server's CA (tls_ca) as well")
            return None
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls_cert and tls_key go together")

        def read(path: Optional[str]) -> Optional[bytes]:
            return pathlib.Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca),
                                            private_key=read(self.key),
                                            certificate_chain=read(self.cert))


@dataclasses.dataclass(frozen=True)
class TokenChunk:
    """Tokens the server streamed together: their ids, their text (valid UTF-8, possibly empty
    while a character is incomplete) and, when asked for, each token's log-probability."""

    token_ids: Sequence[int]
    text: str
    logprobs: Sequence[float]


@dataclasses.dataclass(frozen=True)
class GenerateFinal:
    """The last message of a stream: why generation ended and what it cost."""

    finish_reason: str  # LENGTH, EOS, STOP or CANCELLED
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float
    matched_stop: str


def _request(prompt: Prompt, *, max_new_tokens: Optional[int], temperature: Optional[float],
             top_k: Optional[int], top_p: Optional[float],
             repetition_penalty: Optional[float], seed: Optional[int], stop: Sequence[str],
             stop_token_ids: Sequence[int], ignore_eos: bool, logprobs: bool,
             request_id: str) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(request_id=request_id, return_logprobs=logprobs)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(int(i) for i in prompt)
    # Only the settings given are set: the server's defaults apply to the rest (an unset proto3
    # `optional` field is not the same as 0).
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                        ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            setattr(request.sampling, name, value)
    if max_new_tokens is not None:
        request.stopping.max_new_tokens = max_new_tokens
    request.stopping.stop.extend(stop)
    request.stopping.stop_token_ids.extend(stop_token_ids)
    request.stopping.ignore_eos = ignore_eos
    return request


def _chunk(message: Any) -> TokenChunk:
    return TokenChunk(token_ids=list(message.token_ids), text=message.text,
                      logprobs=list(message.logprobs))


def _final(message: Any) -> GenerateFinal:
    reason = generation_pb2.FinishReason.Name(message.finish_reason)
    return GenerateFinal(finish_reason=reason[len("FINISH_REASON_"):],
                         prompt_tokens=message.prompt_tokens,
                         completion_tokens=message.completion_tokens,
                         queue_seconds=message.queue_seconds,
                         time_to_first_token_seconds=message.time_to_first_token_seconds,
                         total_seconds=message.total_seconds, matched_stop=message.matched_stop)


def _as_dict(message: Any) -> Dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     including_default_value_fields=True)



class GenerateStream:
    """An iterator of TokenChunk for one Generate call. After the last chunk, ``final`` holds the
    GenerateFinal. ``cancel()`` ends the call (the server drops the request at its next step)."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.final: Optional[GenerateFinal] = None

    def __iter__(self) -> Iterator[TokenChunk]:
        for response in self._call:
            if response.HasField("chunk"):
                yield _chunk(response.chunk)
            else:
                self.final = _final(response.final)
        if self.final is None:
            raise ProtocolError("the stream ended without its final message")

    def text(self) -> str:
        """Consumes the stream and returns the whole completion."""
        return "".join(chunk.text for chunk in self)

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """A blocking client on one channel; use it as a context manager or call close()."""

    def __init__(self, addr: str = "localhost:50051", *, tls_ca: Optional[str] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None) -> None:
        credentials = TlsFiles(tls_ca, tls_cert, tls_key).credentials()
        self._channel = (grpc.secure_channel(addr, credentials) if credentials else
                         grpc.insecure_channel(addr))
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def generate(self, prompt: Prompt, *, max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                 seed: Optional[int] = None, stop: Sequence[str] = (),
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 logprobs: bool = False, request_id: str = "",
                 timeout_s: Optional[float] = None) -> GenerateStream:
        """Starts a completion of ``prompt`` (text, or token ids) and returns its stream. Unset
        settings take the server's defaults (max_new_tokens 16, temperature 1, ...); a passed
        ``timeout_s`` cancels the call with DEADLINE_EXCEEDED."""
        request = _request(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                           seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                           ignore_eos=ignore_eos, logprobs=logprobs, request_id=request_id)
        return GenerateStream(self._stub.Generate(request, timeout=timeout_s))

    def model_info(self, timeout_s: Optional[float] = 10) -> Dict[str, Any]:
        """GetModelInfo as a dict with the proto's field names."""
        return _as_dict(self._stub.GetModelInfo(generation_pb2.GetModelInfoRequest(),
                                                timeout=timeout_s))

    def cache_stats(self, timeout_s: Optional[float] = 10) -> Dict[str, Any]:
        """GetCacheStats as a dict with the proto's field names."""
        return _as_dict(self._stub.GetCacheStats(generation_pb2.GetCacheStatsRequest(),
                                                 timeout=timeout_s))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncGenerateStream:
    """An async iterator of TokenChunk for one Generate call on grpc.aio; ``final`` afterwards."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.final: Optional[GenerateFinal] = None

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        async for response in self._call:
            if response.HasField("chunk"):
                yield _chunk(response.chunk)
            else:
                self.final = _final(response.final)
        if self.final is None:
            raise ProtocolError("the stream ended without its final message")

    async def text(self) -> str:
        return "".join([chunk.text async for chunk in self])

    def cancel(self) -> None:
        self._call.cancel()


class AsyncClient:
    """Client's API on grpc.aio, for asyncio programs: ``async with AsyncClient(addr) as c``."""

    def __init__(self, addr: str = "localhost:50051", *, tls_ca: Optional[str] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None) -> None:
        credentials = TlsFiles(tls_ca, tls_cert, tls_key).credentials()
        self._channel = (grpc.aio.secure_channel(addr, credentials) if credentials else
                         grpc.aio.insecure_channel(addr))
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def generate(self, prompt: Prompt, *, max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                 seed: Optional[int] = None, stop: Sequence[str] = (),
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 logprobs: bool = False, request_id: str = "",
                 timeout_s: Optional[float] = None) -> AsyncGenerateStream:
        """As Client.generate; iterate the result with ``async for``."""
        request = _request(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                           seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                           ignore_eos=ignore_eos, logprobs=logprobs, request_id=request_id)
        return AsyncGenerateStream(self._stub.Generate(request, timeout=timeout_s))

    async def model_info(self, timeout_s: Optional[float] = 10) -> Dict[str, Any]:
        return _as_dict(await self._stub.GetModelInfo(generation_pb2.GetModelInfoRequest(),
                                                      timeout=timeout_s))

    async def cache_stats(self, timeout_s: Optional[float] = 10) -> Dict[str, Any]:
        return _as_dict(await self._stub.GetCacheStats(generation_pb2.GetCacheStatsRequest(),
                                                       timeout=timeout_s))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
