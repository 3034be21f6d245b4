"""Python client of kvserve's gRPC Generation API (kvserve.v1).

    from kvserve_client import Client

    with Client("localhost:50051") as client:
        stream = client.generate("The Linux kernel uses", max_new_tokens=32, temperature=0)
        for chunk in stream:             # TokenChunk objects as the server streams them
            print(chunk.text, end="", flush=True)
        print(stream.final.finish_reason)  # "LENGTH", "EOS", "STOP" or "CANCELLED"

AsyncClient is the same API on grpc.aio (``async for chunk in client.generate(...)``). Both take
TLS files (``tls_ca``, and ``tls_cert``/``tls_key`` for mutual TLS). An RPC failure raises
grpc.RpcError; a stream that ends without its final message raises ProtocolError.
"""

from kvserve_client.client import (AsyncClient, AsyncGenerateStream, Client, GenerateFinal,
                                   GenerateStream, ProtocolError, TokenChunk, TlsFiles)

__all__ = ["AsyncClient", "AsyncGenerateStream", "Client", "GenerateFinal", "GenerateStream",
           "ProtocolError", "TlsFiles", "TokenChunk"]
__version__ = "0.1.0"
