"""The baseline: plain grpcio over mutual TLS on loopback, no foedus code, bytes in and out.

Run as a process (`python raw_grpc.py --cert ... --key ... --ca ... --spool DIR`), it serves
four methods of a generic service with identity (bytes) serializers and prints ``port N`` once it
listens:

* ``Upload`` (client stream): counts the bytes of every message and answers the total;
* ``UploadDurable`` (client stream): writes the messages to a new file in the spool folder
  (starting the disk's writeback every `WRITEBACK_BYTES`) and fsyncs it before it answers, as
  any server must that acknowledges only what a crash cannot lose; the files are kept (in the
  benchmark's temporary folder), as an aggregator keeps a round's results;
* ``Download`` (server stream): the request is a size (8 bytes, big-endian), the answer that many
  bytes in `CHUNK_BYTES` messages;
* ``DownloadUnary``: the same bytes in one message.

The client functions below are what the benchmark times against it; `RawClient.download_into`
keeps what it receives in new memory, as a collaborator keeps the model it fetched.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

SERVICE = "foedus.bench.Raw"
CHUNK_BYTES = 2 * 1024 * 1024
MAX_MESSAGE_BYTES = 2**31 - 1
WORKERS = 32  # as the aggregator's server
_SIZE_BYTES = 8
# A durable upload starts the disk writing every this many bytes, as the aggregator does.
WRITEBACK_BYTES = 8 * 1024 * 1024
_sync_file_range = getattr(os, "sync_file_range", None)  # Linux only
_WRITE_BEGIN = getattr(os, "SYNC_FILE_RANGE_WRITE", 2)


def message_options() -> list[tuple[str, int]]:
    """Message-size options that let any payload of this benchmark through, on both sides."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def pattern(size: int) -> bytes:
    """`size` bytes of a repeating, deterministic pattern (TLS cost does not depend on content)."""
    block = bytes(range(256)) * 4096  # 1 MiB
    return (block * (size // len(block) + 1))[:size]


class _Payloads:
    """One buffer per size asked for, made once, so a download sends it without a copy."""

    def __init__(self) -> None:
        self._data: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def get(self, size: int) -> bytes:
        with self._lock:
            if size not in self._data:
                self._data[size] = pattern(size)
            return self._data[size]


def _size(request: bytes) -> int:
    return int.from_bytes(request[:_SIZE_BYTES], "big")


def build_server(
    cert: Path, key: Path, ca: Path, spool: Path, port: int = 0
) -> tuple[grpc.Server, int]:
    """A started server on 127.0.0.1 requiring a client certificate from `ca`; and its port.

    Durable uploads go to new files in `spool`.
    """
    payloads = _Payloads()

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = 0
        for chunk in requests:
            total += len(chunk)
        return total.to_bytes(_SIZE_BYTES, "big")

    def upload_durable(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        descriptor, _ = tempfile.mkstemp(dir=spool, prefix="upload-")
        total = flushed = 0
        with os.fdopen(descriptor, "wb", buffering=0) as file:
            for chunk in requests:
                file.write(chunk)
                total += len(chunk)
                if _sync_file_range and total - flushed >= WRITEBACK_BYTES:
                    # The disk works while the rest arrives.
                    _sync_file_range(descriptor, flushed, total - flushed, _WRITE_BEGIN)
                    flushed = total
            os.fsync(descriptor)
        return total.to_bytes(_SIZE_BYTES, "big")

    def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        size = _size(request)
        view = memoryview(payloads.get(size))
        for start in range(0, size, CHUNK_BYTES):
            yield bytes(view[start : start + CHUNK_BYTES])

    def download_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return payloads.get(_size(request))

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "UploadDurable": grpc.stream_unary_rpc_method_handler(upload_durable),
            "Download": grpc.unary_stream_rpc_method_handler(download),
            "DownloadUnary": grpc.unary_unary_rpc_method_handler(download_unary),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS), options=message_options())
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes(),
        require_client_auth=True,
    )
    bound = server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    return server, bound


class RawClient:
    """One TLS channel to the raw server with its own client certificate."""

    def __init__(self, target: str, ca: Path, cert: Path, key: Path) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=key.read_bytes(),
            certificate_chain=cert.read_bytes(),
        )
        self.channel = grpc.secure_channel(target, credentials, options=message_options())
        # No serializers: requests and responses are the bytes themselves.
        self._upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = self.channel.stream_unary(
            f"/{SERVICE}/Upload"
        )
        self._upload_durable: grpc.StreamUnaryMultiCallable[bytes, bytes] = (
            self.channel.stream_unary(f"/{SERVICE}/UploadDurable")
        )
        self._download: grpc.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(
            f"/{SERVICE}/Download"
        )
        self._download_unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
            f"/{SERVICE}/DownloadUnary"
        )

    def upload(self, payload: bytes, timeout: float = 300.0) -> int:
        """Stream `payload` in `CHUNK_BYTES` messages; the byte count the server saw."""
        answer: bytes = self._upload(_chunks(payload), timeout=timeout)
        return _size(answer)

    def upload_durable(self, payload: bytes, timeout: float = 300.0) -> int:
        """As `upload`, answered once the server has the bytes in a file on disk."""
        answer: bytes = self._upload_durable(_chunks(payload), timeout=timeout)
        return _size(answer)

    def download(self, size: int, timeout: float = 300.0) -> int:
        """Receive `size` bytes as a server stream; the byte count received."""
        request = size.to_bytes(_SIZE_BYTES, "big")
        return sum(len(chunk) for chunk in self._download(request, timeout=timeout))

    def download_into(self, size: int, timeout: float = 300.0) -> int:
        """As `download`, each message copied into one new buffer of `size` bytes, as a client
        that keeps what it fetched must; the byte count received."""
        kept = bytearray(size)
        view = memoryview(kept)
        received = 0
        for chunk in self._download(size.to_bytes(_SIZE_BYTES, "big"), timeout=timeout):
            view[received : received + len(chunk)] = chunk
            received += len(chunk)
        return received

    def download_unary(self, size: int, timeout: float = 300.0) -> int:
        """Receive `size` bytes as one response message; the byte count received."""
        answer: bytes = self._download_unary(size.to_bytes(_SIZE_BYTES, "big"), timeout=timeout)
        return len(answer)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()


def _chunks(payload: bytes) -> Iterator[bytes]:
    for start in range(0, len(payload), CHUNK_BYTES):
        yield payload[start : start + CHUNK_BYTES]


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; print ``port N`` on stdout once listening."""
    parser = argparse.ArgumentParser(description="Raw gRPC-over-TLS server for the benchmark.")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--spool", type=Path, required=True, help="folder for durable uploads")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server, port = build_server(args.cert, args.key, args.ca, args.spool, args.port)
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    print(f"port {port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
