"""OpenFL 1.9's compression pipelines as its peers send them: decoded when the format is fixed, else refused by name.

An OpenFL collaborator whose plan sets `compression_pipeline` sends tensors in that pipeline's
format, and the message does not name the pipeline: it is recognised here from the tags
(`compressed`: the lossless path, `lossy_compressed`: a lossy pipeline) and the shape of
`transformer_metadata`. NoCompressionPipeline, RandomShiftPipeline, KCPipeline, SKCPipeline and
STCPipeline are decoded; EdenPipeline (its bit width and threshold are not in the message) and
anything else are refused. docs/openfl-compression.md has the facts and the OpenFL functions
they come from. No protobuf here: `Metadata` is the caller's copy of a `MetadataProto`.
"""

from __future__ import annotations

import enum
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from foedus.compression.errors import CompressedFormatError, CompressedTooLargeError

Float32Array = npt.NDArray[np.float32]

COMPRESSED_TAG = "compressed"  # OpenFL's lossless path (`TensorCodec.compress`)
LOSSY_TAG = "lossy_compressed"  # a lossy pipeline's output
FLOAT32_BYTES = 4
# The table-coded pipelines send their codes as float32, which holds integers exactly to 2**24.
MAX_TABLE = 1 << 24
_GZIP_WINDOW = 16 + zlib.MAX_WBITS  # zlib reads a gzip stream (header and CRC) and nothing else
_INSTEAD = "set compression_pipeline to NoCompressionPipeline in the collaborator's plan"


class Pipeline(enum.StrEnum):
    """The shipped pipelines a message can be recognised as (STC and SKC look the same)."""

    NO_COMPRESSION = "NoCompressionPipeline"
    RANDOM_SHIFT = "RandomShiftPipeline"
    KMEANS = "KCPipeline"
    SPARSE_TABLE = "STCPipeline or SKCPipeline"
    EDEN = "EdenPipeline"


class UnsupportedPipelineError(CompressedFormatError):
    """An OpenFL pipeline whose payload cannot be decoded from the message alone; named in the message."""


@dataclass(frozen=True)
class Metadata:
    """One `transformer_metadata` entry of a NamedTensor, copied out of its protobuf."""

    int_to_float: Mapping[int, float] = field(default_factory=dict)
    int_list: Sequence[int] = ()
    bool_list: Sequence[bool] = ()


def openfl_pipeline(tags: Sequence[str], metadata: Sequence[Metadata]) -> Pipeline:
    """Which shipped pipeline made a tensor, from its tags and metadata layout; refused if none."""
    lossless, lossy = COMPRESSED_TAG in tags, LOSSY_TAG in tags
    if lossless == lossy:
        which = "both" if lossless else "neither"
        raise CompressedFormatError(
            f"OpenFL tensor with tags {sorted(tags)}: {which} of {COMPRESSED_TAG!r} and "
            f"{LOSSY_TAG!r}, so no pipeline can have made it"
        )
    known = _LAYOUTS.get((lossless, len(metadata)))
    if known is not None:
        pipeline, allowed = known
        if all(_fields(entry) <= fields for entry, fields in zip(metadata, allowed, strict=True)):
            return pipeline
    described = "; ".join(", ".join(sorted(_fields(entry))) or "empty" for entry in metadata)
    raise UnsupportedPipelineError(
        f"an OpenFL compression pipeline that is not one of OpenFL 1.9's shipped ones is refused "
        f"(tags {sorted(tags)}, transformer metadata entries: {described or 'none'}): its format "
        f"is not known, so its values cannot be trusted; {_INSTEAD}"
    )


_SHAPE, _TABLE = "int_list", "int_to_float"
# (lossless path, metadata entries) -> the pipeline and the fields each entry may hold (a scalar's
# shape and an empty tensor's table are empty, so a field may be absent; bool_list never is used).
_LAYOUTS: dict[tuple[bool, int], tuple[Pipeline, tuple[frozenset[str], ...]]] = {
    # Float32NumpyArrayToBytes: the shape. Every lossy pipeline's lossless path is this one too.
    (True, 1): (Pipeline.NO_COMPRESSION, (frozenset({_SHAPE}),)),
    # RandomShiftTransformer: the shift per position and the shape; then the shape again.
    (True, 2): (Pipeline.RANDOM_SHIFT, (frozenset({_SHAPE, _TABLE}), frozenset({_SHAPE}))),
    # EdenTransformer: the shape and (above dim_threshold) seed, size, scales and slice sizes.
    (False, 1): (Pipeline.EDEN, (frozenset({_SHAPE, _TABLE}),)),
    # KmeansTransformer: the shape and the levels; then GZIPTransformer's empty entry.
    (False, 2): (Pipeline.KMEANS, (frozenset({_SHAPE, _TABLE}), frozenset())),
    # SparsityTransformer: the shape; the ternary or k-means levels; GZIPTransformer's entry.
    (False, 3): (
        Pipeline.SPARSE_TABLE,
        (frozenset({_SHAPE}), frozenset({_TABLE}), frozenset()),
    ),
}


def _fields(entry: Metadata) -> frozenset[str]:
    """The fields a metadata entry holds (proto3: an empty one is absent)."""
    present = {_SHAPE: entry.int_list, _TABLE: entry.int_to_float, "bool_list": entry.bool_list}
    return frozenset(name for name, value in present.items() if len(value))


def decode_openfl_tensor(
    tags: Sequence[str],
    metadata: Sequence[Metadata],
    data: bytes,
    *,
    count: int,
    limit: int,
) -> Float32Array:
    """A tensor's `count` values as 1-D float32, as the OpenFL pipeline that sent it meant them.

    `count` is the element count the receiver expects (from its own model), `limit` its byte
    limit for the decoded values; both are checked before anything is inflated or allocated.
    Whether the values are a delta is in the tags (`delta`), for the caller. OpenFL's `lossless`
    field is not read: OpenFL decodes by the tags, and its collaborator sets `lossless` false on
    every delta, whatever the pipeline.
    """
    if count < 0:
        raise ValueError(f"count must be at least 0, got {count}")
    pipeline = openfl_pipeline(tags, metadata)
    what = f"OpenFL {pipeline} payload"
    expected = count * FLOAT32_BYTES
    if expected > limit:
        raise CompressedTooLargeError(
            f"{what}: {count} float32 values are {expected} bytes, over the limit of {limit} bytes"
        )
    check_decodable(pipeline)
    _check_shape(what, metadata[0].int_list, count)
    if pipeline is Pipeline.NO_COMPRESSION:
        values = _float32_values(what, data, count).copy()
    elif pipeline is Pipeline.RANDOM_SHIFT:
        values = _unshifted(what, metadata, data, count)
    else:
        table_entry = metadata[0] if pipeline is Pipeline.KMEANS else metadata[1]
        table = _code_table(what, table_entry.int_to_float, count)
        values = _looked_up(what, table, _gunzipped(what, data, expected))
    _check_finite(what, values)
    return values


def check_decodable(pipeline: Pipeline) -> None:
    """Refuse, naming it, a recognised pipeline whose payload the message alone cannot decode."""
    if pipeline is Pipeline.EDEN:
        raise UnsupportedPipelineError(
            f"OpenFL's EdenPipeline is refused: its bit width (n_bits) and the size up to which "
            f"it sends a tensor uncompressed (dim_threshold) are settings of the sender's plan "
            f"that the message does not carry, so no receiver can decode it from the message "
            f"alone; {_INSTEAD} (or KCPipeline, SKCPipeline or STCPipeline, whose formats are "
            f"fixed)"
        )


def _check_shape(what: str, shape: Sequence[int], count: int) -> None:
    """The shape the message declares must hold exactly the `count` values the receiver expects."""
    if any(dimension < 0 for dimension in shape):
        raise CompressedFormatError(f"{what}: negative dimension in shape {tuple(shape)}")
    declared = math.prod(shape)
    if declared != count:
        raise CompressedFormatError(
            f"{what}: shape {tuple(shape)} holds {declared} values where {count} are expected"
        )


def _float32_values(what: str, data: bytes, count: int) -> Float32Array:
    """`data` as `count` little-endian float32 values, read in place."""
    if len(data) != count * FLOAT32_BYTES:
        raise CompressedFormatError(
            f"{what}: {len(data)} bytes where {count} float32 values need {count * FLOAT32_BYTES}"
        )
    return np.frombuffer(data, dtype="<f4").astype(np.float32, copy=False)


def _table(what: str, table: Mapping[int, float], size: int) -> npt.NDArray[np.float64]:
    """The values of codes 0..size-1, the only keys OpenFL's encoders write, as float64."""
    if len(table) != size:
        raise CompressedFormatError(
            f"{what}: int_to_float has {len(table)} entries where {size} are expected"
        )
    try:
        return np.array([table[code] for code in range(size)], dtype=np.float64)
    except KeyError as missing:
        raise CompressedFormatError(
            f"{what}: int_to_float has no code {missing.args[0]} (its keys must be 0..{size - 1})"
        ) from None


def _unshifted(what: str, metadata: Sequence[Metadata], data: bytes, count: int) -> Float32Array:
    """RandomShiftPipeline: the sent values minus the shift the message carries, per position.

    As OpenFL computes it (`RandomShiftTransformer.backward`): the float32 values minus the
    shifts in float64, here rounded to float32 once, which is OpenFL's float64 result cast.
    """
    if list(metadata[1].int_list) != list(metadata[0].int_list):
        raise CompressedFormatError(
            f"{what}: the shift's shape {tuple(metadata[0].int_list)} differs from the values' "
            f"{tuple(metadata[1].int_list)}"
        )
    values = _float32_values(what, data, count)
    shift = _table(what, metadata[0].int_to_float, count)
    if not np.isfinite(shift).all():
        raise CompressedFormatError(f"{what}: a shift in int_to_float is NaN or infinite")
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, by position
        return (values.astype(np.float64) - shift).astype(np.float32)


def _code_table(what: str, table: Mapping[int, float], count: int) -> Float32Array:
    """A table-coded pipeline's int_to_float as float32: one value per distinct level sent."""
    # A level is a distinct value of the tensor: never more levels than values, at least one.
    least, most = min(count, 1), min(count, MAX_TABLE)
    if not least <= len(table) <= most:
        raise CompressedFormatError(
            f"{what}: int_to_float has {len(table)} levels for {count} values (expected "
            f"{least} to {most})"
        )
    with np.errstate(over="ignore"):  # a float64 past float32's range: refused just below
        levels = _table(what, table, len(table)).astype(np.float32)
    if not np.isfinite(levels).all():
        raise CompressedFormatError(
            f"{what}: a level in int_to_float is NaN or infinite in float32"
        )
    return levels


def _gunzipped(what: str, data: bytes, expected: int) -> bytes:
    """One gzip member inflating to exactly `expected` bytes, never inflated past them."""
    inflater = zlib.decompressobj(_GZIP_WINDOW)
    try:
        raw = inflater.decompress(data, expected + 1)
    except zlib.error as error:
        raise CompressedFormatError(f"{what}: not a gzip stream ({error})") from None
    if len(raw) > expected:
        raise CompressedTooLargeError(
            f"{what}: the gzip stream inflates past the {expected} bytes its values need; refused "
            f"before inflating further"
        )
    if not inflater.eof:
        raise CompressedFormatError(
            f"{what}: the gzip stream of {len(data)} bytes ends before its end (truncated)"
        )
    if inflater.unused_data:
        raise CompressedFormatError(
            f"{what}: {len(inflater.unused_data)} bytes after the gzip stream (OpenFL's encoder "
            f"writes one gzip member and nothing else)"
        )
    if len(raw) != expected:
        raise CompressedFormatError(
            f"{what}: the gzip stream inflates to {len(raw)} bytes where the values need {expected}"
        )
    return raw


def _looked_up(what: str, levels: Float32Array, raw: bytes) -> Float32Array:
    """Each float32 code's level, per position (what the sender meant; see docs/openfl-compression.md)."""
    codes = np.frombuffer(raw, dtype="<f4")
    # Comparisons are false for NaN, so NaN codes are refused with the rest, without a warning.
    valid = (codes >= 0) & (codes < len(levels)) & (np.floor(codes) == codes)
    if not valid.all():
        position = int(np.argmin(valid))
        raise CompressedFormatError(
            f"{what}: code {float(codes[position])} at position {position} is not a level of the "
            f"table (0..{len(levels) - 1})"
        )
    return levels[codes.astype(np.intp)]


def _check_finite(what: str, values: Float32Array) -> None:
    """Decoded values are numbers: a NaN or infinity from a payload is refused, by position."""
    finite = np.isfinite(values)
    if not finite.all():
        position = int(np.argmin(finite))
        raise CompressedFormatError(
            f"{what}: value {float(values[position])} at position {position} is NaN or infinite"
        )
