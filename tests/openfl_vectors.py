"""OpenFL 1.9's compression test vectors, read from the JSON `make_openfl_vectors.py` writes.

`tests/data/openfl_pipelines.json` is committed; `tests/interop/test_openfl_vectors.py` makes a
fresh one with OpenFL and checks it the same way, so neither can drift from OpenFL unseen.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from foedus.compression.openfl import Metadata, decode_openfl_tensor

VECTORS = Path(__file__).resolve().parent / "data" / "openfl_pipelines.json"
# Where OpenFL's own decoder is wrong: KmeansTransformer.backward replaces code by code in place
# (in the map's order), so the 1.0s it writes for code 0 become code 1's 3.0.
GARBLED_BY_OPENFL = frozenset({"KCPipeline(n_clusters=2)/levels"})
Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Vector:
    """A NamedTensor an OpenFL collaborator sent, what OpenFL decodes and what the sender meant."""

    name: str
    pipeline: str
    tags: tuple[str, ...]
    metadata: tuple[Metadata, ...]
    data: bytes
    shape: tuple[int, ...]
    openfl: Float32Array  # OpenFL's decoding, cast to float32 (RandomShift's is float64)
    sent: Float32Array

    @property
    def count(self) -> int:
        """The number of values the tensor holds."""
        return math.prod(self.shape)

    def layout(self) -> list[list[str]]:
        """Per metadata entry, the fields it holds: the part of the format OpenFL could change."""
        return [
            sorted(
                field
                for field, value in vars(entry).items()
                if len(value)  # proto3: an empty field is absent
            )
            for entry in self.metadata
        ]


def load_vectors(path: Path = VECTORS) -> list[Vector]:
    """The vectors in `path`, in the file's order."""
    document = json.loads(path.read_text())
    return [_vector(item) for item in document["vectors"]]


def decode_vector(vector: Vector) -> Float32Array:
    """Our decoding of a vector, with a limit that fits it."""
    return decode_openfl_tensor(
        vector.tags, vector.metadata, vector.data, count=vector.count, limit=4 * vector.count
    )


def check_vector(vector: Vector) -> None:
    """Ours gives the sender's values bit for bit, and so does OpenFL, but where it garbles them."""
    ours = decode_vector(vector)
    assert ours.dtype == np.float32
    assert ours.shape == (vector.count,)
    assert ours.tobytes() == vector.sent.tobytes(), vector.name
    same_as_openfl = ours.tobytes() == vector.openfl.tobytes()
    assert same_as_openfl == (vector.name not in GARBLED_BY_OPENFL), vector.name


def _vector(item: dict[str, Any]) -> Vector:
    """One JSON vector as a `Vector`."""
    metadata = tuple(
        Metadata(
            int_to_float={int(key): float(value) for key, value in entry["int_to_float"]},
            int_list=tuple(entry["int_list"]),
            bool_list=tuple(entry["bool_list"]),
        )
        for entry in item["metadata"]
    )
    return Vector(
        name=item["name"],
        pipeline=item["pipeline"],
        tags=tuple(item["tags"]),
        metadata=metadata,
        data=base64.b64decode(item["data"]),
        shape=tuple(item["shape"]),
        openfl=np.frombuffer(base64.b64decode(item["openfl_decoded"]), "<f8").astype(np.float32),
        sent=np.frombuffer(base64.b64decode(item["sent"]), "<f4").astype(np.float32),
    )
