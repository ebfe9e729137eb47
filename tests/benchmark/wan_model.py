"""The wide-area round's real model, in numbers only (no PyTorch): its layers for a size in MiB.

A multilayer perceptron on the digits images (64 pixels in, 10 classes out) whose hidden layers
are `width` wide, as wide as makes the model's float32 parameters about `model_mb` MiB; the
PyTorch runner that trains it (`wan_torch.py`) builds it from the same numbers, and the
benchmark, which has no PyTorch, counts the floor of a round from them.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Final

FEATURES: Final = 64  # 8x8 pixels
CLASSES: Final = 10
HIDDEN: Final = 3  # hidden layers: two width x width matrices hold nearly all the parameters
FLOAT32_BYTES: Final = 4
MIB: Final = 1024 * 1024


def layer_sizes(width: int) -> list[tuple[int, int]]:
    """Each linear layer's (inputs, outputs), input to logits."""
    sizes = [FEATURES, *([width] * HIDDEN), CLASSES]
    return list(pairwise(sizes))


def parameter_bytes(width: int) -> int:
    """The model's bytes on the wire: each layer's float32 weight and bias."""
    return FLOAT32_BYTES * sum(inputs * outputs + outputs for inputs, outputs in layer_sizes(width))


def width_for(model_mb: float) -> int:
    """The hidden width whose model is closest to `model_mb` MiB (at least 1)."""
    # parameters = (HIDDEN - 1) w^2 + (FEATURES + HIDDEN + CLASSES) w + CLASSES: the root, rounded.
    a, b = HIDDEN - 1, FEATURES + HIDDEN + CLASSES
    c = CLASSES - model_mb * MIB / FLOAT32_BYTES
    root = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    return max(1, round(root))
