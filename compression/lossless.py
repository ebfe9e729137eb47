"""The `lossless` code: a tensor's bytes cut into chunks, each a Blosc2 chunk (byte shuffle, zstd).

Any dtype: the byte shuffle groups the i-th byte of every item (`typesize` = the dtype's item
size), so a float's sign and exponent bytes, which vary little, compress apart from its noisy
mantissa. Measured on a trained MLP's float32 weights and one epoch's update delta (4.5 MB,
1 MiB chunks, one thread): Blosc2 zstd level 1 with the shuffle keeps 1/1.18 of the weights'
bytes and 1/1.69 of the delta's at 500-800 MB/s in and 1-2 GB/s out; zstandard on numpy's own
shuffle matches the ratio but decodes at 0.6 GB/s; lz4 or bit shuffle keep more bytes, higher
zstd levels gain nothing for 3-100 x the time.

A tensor of n raw bytes is `chunk_sizes(n, itemsize)` chunks of `CHUNK_BYTES` (the last
shorter), each compressed on its own, so a 100 MB tensor streams in bounded memory and its
chunks travel end to end: each chunk's 32-byte header says its length. The receiver knows each
chunk's raw size from its own model (shape and dtype) and this rule, which is part of the wire
format (peers must agree on `CHUNK_BYTES`); a decoder checks the header against it,
and against what foedus' encoder writes, before Blosc2 reads a byte past the header
(`check_header`): a chunk that would inflate past its size, a truncated one, or one using
Blosc2's features foedus never writes (dictionaries, lazy chunks, uninitialised values, other
codecs or filters) is refused with `CompressedFormatError` or `CompressedTooLargeError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import cache
from types import ModuleType

import numpy as np
import numpy.typing as npt

from foedus.compression.errors import CompressedFormatError, CompressedTooLargeError

CHUNK_BYTES = 1024 * 1024  # the raw bytes of a chunk (the last one of a tensor: what is left)
HEADER_BYTES = 32  # Blosc2's extended chunk header, which starts every chunk
# The most a Blosc2 chunk adds to its raw bytes (c-blosc2's BLOSC2_MAX_OVERHEAD): a chunk that
# does not compress is stored as it is ("memcpyed") after its header.
MAX_OVERHEAD = 32
LEVEL = 1  # zstd's level in Blosc2: higher levels gained nothing on model weights (see above)
MAX_ITEMSIZE = 255  # Blosc2's typesize is one byte

# What foedus' encoder writes into a header (README_CHUNK_FORMAT.rst of c-blosc2), so the decoder
# can refuse every other kind of chunk before Blosc2 reads it.
FORMAT_VERSION = 5  # Blosc2's stable chunk format
_EXTENDED = 0x01 | 0x04  # flags bits 0 and 2 both set: the 32-byte extended header
_MEMCPYED = 0x02  # flags: the blocks are stored as they are (data that does not compress)
_DELTA = 0x08  # flags: Blosc1's delta filter (never written by foedus)
# flags bit 4 (a block is one stream, not one per byte of an item) may be either.
_ZSTD = 4  # flags >> 5: the compressor's enumeration
_CODECS = {0: (_ZSTD,), _MEMCPYED: (0, _ZSTD)}  # a chunk stored as it is names no codec
_SHUFFLE = 1  # c-blosc2's BLOSC_SHUFFLE filter
_SHUFFLE_ONLY = bytes([_SHUFFLE, 0, 0, 0, 0, 0])  # the filter pipeline
_SPECIAL_NONE, _SPECIAL_ZEROS = 0, 1  # blosc2_flags bits 4-6: a chunk of zeros has no blocks
_HEADER = struct.Struct("<BBBBiii6sBB6sBB")


@cache
def _blosc2() -> ModuleType:
    """Blosc2, imported at the first chunk coded: it takes 0.15 s (it brings an HTTP client
    along), which every service of a federation without the lossless code would pay at start."""
    import blosc2  # noqa: PLC0415

    # Blosc2 holds the GIL while it works unless told (process-wide; foedus is its only user): a
    # service's other threads (other streams, heartbeats) then run while a chunk is coded. Two
    # threads coding 1 MiB chunks took 0.09 s for what one took 0.14 s (0.15 s holding the GIL).
    # No Python code runs inside: the header check refuses codecs and filters registered from
    # Python.
    blosc2.set_releasegil(True)
    module: ModuleType = blosc2  # the library has no type hints
    return module


def chunk_bytes(itemsize: int) -> int:
    """The raw bytes of a full chunk of items of `itemsize` bytes: a chunk ends on an item."""
    _check_itemsize(itemsize)
    return CHUNK_BYTES // itemsize * itemsize


def chunk_sizes(total_bytes: int, itemsize: int) -> Iterator[int]:
    """The raw size of each chunk of a tensor of `total_bytes`, in order (none for no bytes)."""
    if total_bytes < 0 or total_bytes % itemsize:
        raise ValueError(f"{total_bytes} bytes are not a whole number of {itemsize}-byte items")
    full = chunk_bytes(itemsize)
    for start in range(0, total_bytes, full):
        yield min(full, total_bytes - start)


def compress_chunk(raw: bytes | memoryview, itemsize: int) -> bytes:
    """One chunk of raw bytes (whole items, at most `chunk_bytes(itemsize)`) as a Blosc2 chunk."""
    size = memoryview(raw).nbytes
    if not 0 < size <= chunk_bytes(itemsize) or size % itemsize:
        raise ValueError(
            f"a chunk is 1 to {chunk_bytes(itemsize)} bytes of whole {itemsize}-byte items, "
            f"not {size} bytes"
        )
    blosc2 = _blosc2()
    frame: bytes = blosc2.compress2(
        raw,
        typesize=itemsize,
        clevel=LEVEL,
        codec=blosc2.Codec.ZSTD,
        filters=[blosc2.Filter.SHUFFLE],
        nthreads=1,  # the services run many streams at once on few cores: no pool of its own
    )
    return frame


def compress_chunks(raw: bytes | memoryview, itemsize: int) -> Iterator[bytes]:
    """A whole tensor's raw bytes as its chunks, one at a time (`chunk_sizes` cuts them)."""
    view = memoryview(raw).cast("B")
    start = 0
    for size in chunk_sizes(view.nbytes, itemsize):
        yield compress_chunk(view[start : start + size], itemsize)
        start += size


def check_header(
    header: bytes | bytearray | memoryview, *, expected_bytes: int, itemsize: int, tensor: str = ""
) -> int:
    """The whole length of the chunk whose first `HEADER_BYTES` are `header`, once the header
    is one foedus' encoder writes for `expected_bytes` raw bytes of `itemsize`-byte items.

    `CompressedTooLargeError` when it declares more raw bytes than `expected_bytes`,
    `CompressedFormatError` for anything else it cannot be; nothing is inflated.
    """
    where = _where(tensor)
    if memoryview(header).nbytes < HEADER_BYTES:
        raise CompressedFormatError(
            f"{where}: {memoryview(header).nbytes} bytes, shorter than Blosc2's {HEADER_BYTES}-byte header: "
            "not a chunk foedus' lossless code writes"
        )
    (
        version,
        _versionlz,
        flags,
        typesize,
        nbytes,
        blocksize,
        cbytes,
        filters,
        _codec,
        codec_meta,
        filters_meta,
        reserved,
        blosc2_flags,
    ) = _HEADER.unpack_from(header)
    if version != FORMAT_VERSION:
        raise CompressedFormatError(
            f"{where}: Blosc2 chunk format {version}, where foedus reads format "
            f"{FORMAT_VERSION}: not a chunk foedus' lossless code writes"
        )
    codec = flags >> 5  # a stored chunk (memcpyed, small or random) names none: 0
    if flags & _EXTENDED != _EXTENDED or flags & _DELTA or codec not in _CODECS[flags & _MEMCPYED]:
        raise CompressedFormatError(
            f"{where}: Blosc2 flags {flags:#04x}; foedus writes zstd chunks with the extended "
            "header and no delta filter"
        )
    if (filters, filters_meta, codec_meta, reserved) != (_SHUFFLE_ONLY, bytes(6), 0, 0):
        raise CompressedFormatError(
            f"{where}: Blosc2 filters {list(filters)} (meta {list(filters_meta)}); foedus "
            f"writes a byte shuffle alone ({list(_SHUFFLE_ONLY)})"
        )
    if blosc2_flags & ~0x70 or (blosc2_flags >> 4) not in (_SPECIAL_NONE, _SPECIAL_ZEROS):
        raise CompressedFormatError(
            f"{where}: Blosc2 chunk flags {blosc2_flags:#04x} (a dictionary, a lazy chunk, a "
            "longer header or values it does not hold) that foedus never writes"
        )
    if typesize != itemsize:
        raise CompressedFormatError(
            f"{where}: items of {typesize} bytes, where the tensor's dtype has {itemsize}"
        )
    if nbytes != expected_bytes:
        error = CompressedTooLargeError if nbytes > expected_bytes else CompressedFormatError
        raise error(
            f"{where}: declares {nbytes} raw bytes where this chunk of the tensor has "
            f"{expected_bytes}: refused before it is inflated"
        )
    if not 0 < blocksize <= max(nbytes, 1):
        raise CompressedFormatError(
            f"{where}: Blosc2 blocks of {blocksize} bytes in a chunk of {nbytes}"
        )
    if not HEADER_BYTES <= cbytes <= nbytes + MAX_OVERHEAD:
        raise CompressedFormatError(
            f"{where}: declares {cbytes} compressed bytes for {nbytes} raw; a Blosc2 chunk "
            f"has {HEADER_BYTES} to raw + {MAX_OVERHEAD}"
        )
    return int(cbytes)


def decompress_chunk(
    frame: bytes | memoryview, *, expected_bytes: int, itemsize: int, tensor: str = ""
) -> bytes:
    """The raw bytes of one chunk, which must be `expected_bytes` (see `check_header`)."""
    if expected_bytes <= 0:
        raise ValueError(f"a chunk has 1 byte or more, not {expected_bytes}")
    out = bytearray(_checked(frame, expected_bytes, itemsize, tensor))
    _inflate(frame, np.frombuffer(out, np.uint8), tensor)
    return bytes(out)


def decompress_chunk_into(
    frame: bytes | memoryview, out: memoryview, itemsize: int, *, tensor: str = ""
) -> None:
    """Inflate one chunk straight into `out` (writable, the chunk's place in the receive
    array), whose length is the chunk's raw size (see `check_header`)."""
    target = np.frombuffer(out, np.uint8)  # bytes of any memoryview, no copy
    if not target.flags.writeable or target.nbytes == 0:
        raise ValueError("a chunk is inflated into a writable buffer of 1 byte or more")
    _checked(frame, target.nbytes, itemsize, tensor)
    _inflate(frame, target, tensor)


class TensorDecompressor:
    """A tensor's lossless chunks, fed as they arrive in slices of any size, inflated into
    `out` (its receive array's bytes) chunk by chunk: at most one chunk is held at a time."""

    def __init__(self, out: memoryview, itemsize: int, *, tensor: str = "") -> None:
        self._out = memoryview(out).cast("B")
        self._itemsize = itemsize
        self._tensor = tensor
        self._sizes = list(chunk_sizes(self._out.nbytes, itemsize))
        self._done = 0  # chunks inflated
        self._written = 0  # raw bytes written into out
        self._pending = bytearray()  # the start of the chunk being received
        self._length = 0  # its whole length, once its header is read (0: not yet)

    def feed(self, data: bytes | memoryview) -> None:
        """Take the next compressed bytes; each chunk is inflated as soon as it is whole."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            if self._done == len(self._sizes):
                raise CompressedFormatError(
                    f"{_whole(self._tensor)}: {view.nbytes} bytes past its "
                    f"{len(self._sizes)} chunks"
                )
            if not self._pending and view.nbytes >= HEADER_BYTES:
                view = self._inflate_whole(view)
                continue
            need = (self._length or HEADER_BYTES) - len(self._pending)
            self._pending += view[:need]
            view = view[need:]
            if not self._length and len(self._pending) == HEADER_BYTES:
                self._length = check_header(
                    self._pending,
                    expected_bytes=self._sizes[self._done],
                    itemsize=self._itemsize,
                    tensor=self._tensor,
                )
            if self._length and len(self._pending) == self._length:
                self._inflate_pending()

    def finish(self) -> None:
        """Check that every chunk of the tensor came whole."""
        if self._done < len(self._sizes):
            raise CompressedFormatError(
                f"{_whole(self._tensor)}: ended after {self._done} of the tensor's "
                f"{len(self._sizes)} chunks ({self._written} of {self._out.nbytes} raw bytes)"
            )

    def _inflate_whole(self, view: memoryview) -> memoryview:
        """A chunk that starts `view`: inflated from it in place when it is whole there (no
        copy), else its start kept; what follows it."""
        length = check_header(
            view[:HEADER_BYTES],
            expected_bytes=self._sizes[self._done],
            itemsize=self._itemsize,
            tensor=self._tensor,
        )
        if view.nbytes < length:
            self._length = length
            self._pending += view
            return view[view.nbytes :]
        self._inflate(view[:length])
        return view[length:]

    def _inflate_pending(self) -> None:
        self._inflate(memoryview(self._pending))
        self._pending = bytearray()

    def _inflate(self, frame: memoryview) -> None:
        size = self._sizes[self._done]
        target = self._out[self._written : self._written + size]
        decompress_chunk_into(frame, target, self._itemsize, tensor=self._tensor)
        self._written += size
        self._done += 1
        self._length = 0


def _checked(frame: bytes | memoryview, expected_bytes: int, itemsize: int, tensor: str) -> int:
    """`check_header` of `frame`, and the frame's length the one it declares."""
    length = check_header(frame, expected_bytes=expected_bytes, itemsize=itemsize, tensor=tensor)
    if memoryview(frame).nbytes != length:
        raise CompressedFormatError(
            f"{_where(tensor)}: declares {length} compressed bytes, but {memoryview(frame).nbytes} "
            "came: a chunk is sent whole, and alone"
        )
    return expected_bytes


def _inflate(frame: bytes | memoryview, target: npt.NDArray[np.uint8], tensor: str) -> None:
    """Blosc2's decompression of a checked chunk into `target`; a corrupt body refused."""
    try:
        _blosc2().decompress2(frame, dst=target, nthreads=1)
    except (RuntimeError, ValueError) as error:
        raise CompressedFormatError(
            f"{_where(tensor)}: Blosc2 cannot decompress it ({error}): the chunk is corrupt"
        ) from None


def _check_itemsize(itemsize: int) -> None:
    if not 1 <= itemsize <= MAX_ITEMSIZE:
        raise ValueError(f"an item is 1 to {MAX_ITEMSIZE} bytes, not {itemsize}")


def _where(tensor: str) -> str:
    """What a message names: a lossless chunk, and of which tensor when the caller said."""
    return f"lossless chunk of tensor {tensor!r}" if tensor else "lossless chunk"


def _whole(tensor: str) -> str:
    """What a message names: a lossless tensor, and which when the caller said."""
    return f"lossless tensor {tensor!r}" if tensor else "lossless tensor"
