"""A site's update in the plan's `compression.upload` code: a delta from the model it trained on.

Each tensor of the trained model is coded against `base`, the global model of the round as this
site received it (`foedus.protos.codec` has each code's payload, said once):

* ``lossless``: every tensor, of any dtype: its little-endian bytes XOR the base's, bit for bit,
  cut by `foedus.compression.lossless.chunk_sizes` and each piece compressed (the XOR of a
  tensor that moved little is mostly zero bits, which compress; the receiver XORs the base back
  and gets the very bits trained).
* ``bfloat16``, ``int8``, ``topk``: float32 tensors only (the others travel raw, as trained):
  the delta trained - base in float32, plus what the code left out of this site's earlier
  updates (error feedback, `foedus.compression.feedback`), coded; what the code leaves out this
  time is kept for the next round. The receiver adds the decoded delta to the base.

A tensor whose delta holds a NaN or an infinity (a training that diverged) cannot be coded
lossily: it travels raw, as with no code, so the aggregator answers it as it answers any such
tensor (refused, unless the plan's `limits.allow_non_finite`), and its residual stays as it was.

`UploadEncoder` keeps the residuals durably (`ResidualStore`, in the site's state folder): they
are saved before the upload is sent, so a site killed and restarted that trains a round again
reads the residuals it read the first time and sends the very same bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from foedus.compression.codes import Code
from foedus.compression.feedback import (
    ResidualsFileError,
    ResidualStore,
    compensated,
    read_residuals,
    residual_after,
)
from foedus.compression.lossless import chunk_bytes, chunk_sizes, compress_chunk
from foedus.compression.quantize import (
    bfloat16_decode,
    bfloat16_encode,
    int8_decode,
    int8_encode,
)
from foedus.compression.topk import topk_decode, topk_encode
from foedus.compression.vectors import Float32Array, first_nonfinite
from foedus.durable.files import make_folders
from foedus.plans.schema import CodeSettings
from foedus.protos.codec import tensor_bytes
from foedus.protos.dtypes import is_bfloat16
from foedus.refusals.errors import StorageError

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]
RESIDUALS_FOLDER = "residuals"  # in the site's state folder: its error feedback, a file a round
FOLDER_MODE = 0o700


class ResidualsError(StorageError):
    """This site's residuals (its error feedback) cannot be read or kept; the message names the file."""


@dataclass(frozen=True)
class CodedPayload:
    """One tensor of an upload in a code: its payload, and the dtype and shape it decodes to."""

    code: Code
    payload: bytes
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]
    delta: bool = True  # an upload's coded tensor is always a delta from the site's base


@dataclass(frozen=True)
class EncodedUpload:
    """A trained model coded for its upload: each tensor's payload (None: it travels raw), and
    the residuals to keep for the next round (empty for `lossless`)."""

    coded: dict[str, CodedPayload | None]
    residuals: dict[str, Float32Array]


def encode_upload(
    settings: CodeSettings,
    base: Mapping[str, Array],
    trained: Mapping[str, Array],
    residuals: Mapping[str, Float32Array],
) -> EncodedUpload:
    """`trained` coded against `base` in `settings`' code (not `none`), with the lossy codes'
    `residuals` of the rounds before; pure, deterministic: the same inputs give the same bytes."""
    code = settings.code
    if code is Code.NONE:
        raise ValueError("compression.upload is none: the update travels raw, nothing to code")
    coded: dict[str, CodedPayload | None] = {}
    kept: dict[str, Float32Array] = {}
    for name, array in trained.items():
        values, reference = np.asarray(array), np.asarray(base[name])
        if values.shape != reference.shape or values.dtype != reference.dtype:
            raise ValueError(
                f"tensor {name!r}: trained {values.dtype}{list(values.shape)} against a base of "
                f"{reference.dtype}{list(reference.shape)}"
            )
        if code is Code.LOSSLESS:
            coded[name] = CodedPayload(
                code, xor_payload(values, reference), values.dtype, values.shape
            )
            continue
        if not _is_float32(values.dtype):
            coded[name] = None  # a lossy code codes float32 values; the others travel raw
            continue
        residual = residuals.get(name)
        payload, left = _lossy(settings, name, values, reference, residual)
        coded[name] = (
            None if payload is None else CodedPayload(code, payload, values.dtype, values.shape)
        )
        if left is not None:
            kept[name] = left
        elif residual is not None:
            kept[name] = residual  # sent raw: what the code left out before is still owed
    return EncodedUpload(coded, kept)


def xor_payload(trained: Array, base: Array) -> bytes:
    """The lossless payload of `trained` against `base`: their little-endian bytes XORed, a
    chunk at a time (`chunk_sizes`), each chunk compressed; a chunk's worth of memory more."""
    itemsize = trained.dtype.itemsize
    ours, theirs = _raw_bytes(trained), _raw_bytes(base)
    scratch = np.empty(chunk_bytes(itemsize) if ours.size else 0, dtype=np.uint8)
    chunks: list[bytes] = []
    start = 0
    for size in chunk_sizes(ours.size, itemsize):
        piece = scratch[:size]
        np.bitwise_xor(ours[start : start + size], theirs[start : start + size], out=piece)
        chunks.append(compress_chunk(tensor_bytes(piece), itemsize))
        start += size
    return b"".join(chunks)


def _raw_bytes(array: Array) -> npt.NDArray[np.uint8]:
    """The array's values as they travel: little-endian, C order, as flat bytes (no copy when
    they already are)."""
    dtype = array.dtype if is_bfloat16(array.dtype) else array.dtype.newbyteorder("<")
    data = np.ascontiguousarray(array, dtype=dtype)
    return np.frombuffer(tensor_bytes(data), dtype=np.uint8)


def _is_float32(dtype: np.dtype[np.generic]) -> bool:
    """Whether values are float32 (in either byte order): what the lossy codes code."""
    return dtype.kind == "f" and dtype.itemsize == 4


# A lossy code's encoder and decoder of a 1-D float32 vector (`count` values), by code.
_Encode = Callable[[Float32Array, CodeSettings, str], bytes]
_Decode = Callable[[bytes, int, str], Float32Array]


def _topk(values: Float32Array, settings: CodeSettings, name: str) -> bytes:
    if settings.fraction is None:
        raise ValueError("compression.upload: topk needs its fraction")
    return topk_encode(values, settings.fraction, values_code=settings.values, name=name)


_LOSSY: dict[Code, tuple[_Encode, _Decode]] = {
    Code.BFLOAT16: (
        lambda values, _, name: bfloat16_encode(values, name=name),
        lambda payload, count, name: bfloat16_decode(payload, count, name=name),
    ),
    Code.INT8: (
        lambda values, _, name: int8_encode(values, name=name),
        lambda payload, count, name: int8_decode(payload, count, name=name),
    ),
    Code.TOPK: (_topk, lambda payload, count, name: topk_decode(payload, count, name=name)),
}


def _lossy(
    settings: CodeSettings,
    name: str,
    trained: Array,
    base: Array,
    residual: Float32Array | None,
) -> tuple[bytes | None, Float32Array | None]:
    """The payload of one float32 tensor's compensated delta and the residual it leaves (in the
    tensor's shape); (None, None) when the delta is not finite: the tensor travels raw."""
    encode, decode = _LOSSY[settings.code]
    delta: Float32Array = np.empty(trained.shape, dtype=np.float32)  # an array for a scalar too
    np.subtract(trained, base, out=delta, dtype=np.float32)
    total = np.ascontiguousarray(compensated(delta, residual))
    vector = total.reshape(-1)  # C order, as the payload's values are
    position = first_nonfinite(vector) if vector.size else None
    if position is not None:
        logger.warning(
            "tensor %r: its update holds a NaN or an infinity (value %d): sent as trained, "
            "without %s; the aggregator refuses it unless the plan allows non-finite values",
            name,
            position,
            settings.code,
        )
        return None, None
    payload = encode(vector, settings, name)
    # What the aggregator will add: the very values this payload decodes to.
    decoded = decode(payload, vector.size, name)
    return payload, residual_after(vector, decoded).reshape(trained.shape)


class UploadEncoder:
    """Codes each train result in the plan's upload code, keeping the lossy codes' residuals in
    `residuals` (a `ResidualStore`; None for `lossless`, which needs none)."""

    def __init__(self, settings: CodeSettings, residuals: ResidualStore | None) -> None:
        if settings.code is Code.NONE:
            raise ValueError("compression.upload is none: no encoder is needed")
        if settings.code.lossy and residuals is None:
            raise ValueError(f"compression.upload {settings.code} keeps residuals: give it a store")
        self.settings = settings
        self.residuals = residuals

    def encode(
        self, round_number: int, base: Mapping[str, Array], trained: Mapping[str, Array]
    ) -> dict[str, CodedPayload | None]:
        """Round `round_number`'s trained model coded against `base`; the residuals it leaves
        are saved, durably, before this returns (so before the upload is sent)."""
        store = self.residuals
        if store is None:  # lossless: nothing is left out, nothing is kept
            return encode_upload(self.settings, base, trained, {}).coded
        try:
            before = store.load(round_number)
        except ResidualsFileError as error:
            raise ResidualsError(str(error)) from None
        _check_shapes(store, round_number, before, trained)
        encoded = encode_upload(self.settings, base, trained, before)
        try:
            store.save(round_number, encoded.residuals)
        except OSError as error:
            raise ResidualsError(
                f"{store.path(round_number)}: cannot keep this site's residuals: "
                f"{error.strerror or error}"
            ) from None
        logger.debug(
            "round %d: the update's residuals (%d tensors) are kept in %s",
            round_number,
            len(encoded.residuals),
            store.folder,
        )
        return encoded.coded


def _check_shapes(
    store: ResidualStore,
    round_number: int,
    residuals: Mapping[str, Float32Array],
    trained: Mapping[str, Array],
) -> None:
    """`ResidualsError` for a residual whose tensor has another shape now: another model's."""
    for name, residual in residuals.items():
        if name in trained and residual.shape != np.shape(trained[name]):
            newest = max(number for number in store.rounds() if number < round_number)
            raise ResidualsError(
                f"{store.path(newest)}: the residual of tensor {name!r} has shape "
                f"{residual.shape}, where the model's has {np.shape(trained[name])}: another "
                "model's residuals; remove the folder's files to start the feedback from zero"
            )


def residual_store(state_folder: Path, settings: CodeSettings) -> ResidualStore | None:
    """The store of this site's residuals in its state folder when its upload code is lossy
    (None otherwise), made and every file in it read once: `ResidualsError` names a file that
    cannot be trusted, before anything is sent."""
    if not settings.code.lossy:
        return None
    store = ResidualStore(state_folder / RESIDUALS_FOLDER)
    try:
        make_folders(store.folder)
        if not store.folder.is_dir():
            raise NotADirectoryError("not a folder")
        os.chmod(store.folder, FOLDER_MODE)  # a site's residuals tell of its updates
        for number in store.rounds():
            read_residuals(store.path(number), number)
    except ResidualsFileError as error:
        raise ResidualsError(str(error)) from None
    except OSError as error:
        raise ResidualsError(
            f"{store.folder}: cannot keep this site's residuals there: {error.strerror or error}"
        ) from None
    return store
