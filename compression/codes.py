"""The codes a plan's `compression` section names, and what each is: lossy or not, fit for a
download or not. Said once here; the plan's reader and the wire ask these, never a list of names.
"""

from __future__ import annotations

import enum

import numpy as np


class Code(enum.StrEnum):
    """How a tensor's values travel: as they are, compressed losslessly, or coded with a loss."""

    NONE = "none"  # the raw bytes, as OpenFL sends them
    LOSSLESS = "lossless"  # Blosc2 (byte shuffle, zstd) per chunk: the same bits back
    BFLOAT16 = "bfloat16"  # each float32 rounded to bfloat16: 2 bytes a value
    INT8 = "int8"  # one byte a value and a float32 scale per block of values
    TOPK = "topk"  # only the largest values of an update's delta, with their indices

    @property
    def lossy(self) -> bool:
        """Whether decoding gives back other values than were encoded (then a site keeps the
        error it made, error feedback, and the upload is a delta from the global model)."""
        return self in LOSSY

    @property
    def for_download(self) -> bool:
        """Whether the aggregator may send the model with it: a download sends the whole model,
        and `topk` keeps only a fraction of an update's values (it is for uploads only)."""
        return self is not Code.TOPK


LOSSY = frozenset({Code.BFLOAT16, Code.INT8, Code.TOPK})
# A lossy code carries float32 tensors of this many dimensions or more (weights: a layer's
# matrix, a convolution's kernels, an embedding); vectors and scalars (biases, a normalisation
# layer's scales and statistics) travel raw. Their bytes are few, and their values are what
# coding a delta with a loss breaks first: topk 1% of a batch norm's running variance, with
# error feedback, took it below zero and the digits CNN's training to NaN.
LOSSY_MIN_DIMENSIONS = 2


def carried_code(code: Code, dtype: np.dtype[np.generic], dimensions: int) -> Code:
    """The code a tensor of `dtype` and `dimensions` travels in when the plan says `code`:
    `lossless` any tensor, a lossy code float32 tensors of `LOSSY_MIN_DIMENSIONS` or more;
    `none` (its raw values) otherwise. Both directions ask this, so both sides agree."""
    float32 = dtype.kind == "f" and dtype.itemsize == 4
    if code.lossy and not (float32 and dimensions >= LOSSY_MIN_DIMENSIONS):
        return Code.NONE
    return code


# `topk`'s own settings: the share of an update's values kept, and how the kept values travel.
TOPK_MAX_FRACTION = 0.5  # past half the values, the indices cost more than they save
TOPK_VALUES = ("float32", "int8")
