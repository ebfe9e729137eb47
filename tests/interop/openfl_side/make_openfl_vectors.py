"""Encode small arrays with each of OpenFL 1.9's compression pipelines: run in OpenFL's virtualenv.

    python make_openfl_vectors.py OUTPUT.json

Each vector is a `NamedTensor` as an OpenFL collaborator sends it (`TensorCodec.compress`, then
`utils.construct_named_tensor`, serialized and parsed again, so maps iterate as a receiver's
do), with what OpenFL's own aggregator decodes from it (`TensorCodec.decompress`, as
`Aggregator._process_named_tensor` calls it) and what the sender meant: for the table-coded
pipelines (KC, SKC, STC) each position's code looked up in the message's `int_to_float`, for
the others OpenFL's decoding. `tests/test_openfl_pipelines.py` decodes every vector with
`foedus.compression.openfl` and compares; `tests/data/openfl_pipelines.json` is this script's
output, committed (regenerated and checked by `tests/interop/test_openfl_vectors.py`).
EdenPipeline needs PyTorch, which OpenFL's virtualenv here has not: it has no vector.
"""

from __future__ import annotations

import base64
import gzip
import json
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
from openfl.pipelines import (
    KCPipeline,
    NoCompressionPipeline,
    RandomShiftPipeline,
    SKCPipeline,
    STCPipeline,
    TensorCodec,
)
from openfl.protocols import base_pb2, utils
from openfl.utilities import TensorKey

SEED = 24  # numpy's global generator, which RandomShift and scikit-learn's KMeans draw from
TABLE_CODED = {"KCPipeline", "SKCPipeline", "STCPipeline"}


def arrays():
    """name: (the trained array, the global model it was trained from, or None)."""
    rng = np.random.default_rng(SEED)
    base = rng.normal(0.0, 0.05, (8, 16)).astype(np.float32)
    trained = (base + rng.normal(0.0, 0.01, base.shape)).astype(np.float32)
    return {
        "weights": (rng.normal(0.0, 0.05, (4, 5)).astype(np.float32), None),
        "delta": (trained, base),
        "scalar": (np.array(0.25, dtype=np.float32), np.array(0.5, dtype=np.float32)),
        "empty": (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)),
        "long": (rng.normal(0.0, 0.02, 300).astype(np.float32), np.zeros(300, np.float32)),
        # Two levels that are the codes' own integers: KCPipeline(n_clusters=2) tables them as
        # {0: 1.0, 1: 3.0}, and OpenFL's decoder, which replaces code by code in place, turns
        # the 1.0s it wrote for code 0 into 3.0 when it reaches code 1 (or not: map order).
        "levels": (np.array([1.0, 3.0, 1.0, 3.0, 3.0, 1.0], np.float32), np.zeros(6, np.float32)),
    }


# (pipeline, its settings, the arrays it encodes)
CASES = [
    ("NoCompressionPipeline", {}, ["weights", "delta", "scalar", "empty"]),
    ("RandomShiftPipeline", {}, ["weights", "delta", "scalar", "empty"]),
    ("KCPipeline", {}, ["weights", "delta", "scalar", "empty", "long"]),
    ("KCPipeline", {"n_clusters": 2}, ["levels"]),
    ("STCPipeline", {}, ["weights", "delta", "scalar", "long"]),
    ("STCPipeline", {"p_sparsity": 0.01}, ["long"]),
    ("SKCPipeline", {}, ["delta", "scalar", "long"]),
]
PIPELINES = {
    pipeline.__name__: pipeline
    for pipeline in (
        NoCompressionPipeline,
        RandomShiftPipeline,
        KCPipeline,
        STCPipeline,
        SKCPipeline,
    )
}


def b64(array, dtype):
    """The array's values as little-endian `dtype`, base64."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def send(codec, name, trained, base):
    """The NamedTensor a collaborator sends: a delta upload when it holds the global model."""
    key = TensorKey(name, "site", 1, False, ("trained",))
    if base is None:  # OpenFL sends everything but a trained delta through the lossless path
        key, data, metadata = codec.compress(key, trained, require_lossless=True)
        lossless = True
    else:
        key, delta = codec.generate_delta(key, trained, base)
        key, data, metadata = codec.compress(key, delta)
        lossless = False
    tensor = utils.construct_named_tensor(key, data, metadata, lossless=lossless)
    return base_pb2.NamedTensor.FromString(tensor.SerializeToString())


def openfl_decoded(codec, tensor):
    """What OpenFL 1.9's aggregator decodes from `tensor` (before it adds a delta back)."""
    metadata = [
        {
            "int_to_float": entry.int_to_float,
            "int_list": entry.int_list,
            "bool_list": entry.bool_list,
        }
        for entry in tensor.transformer_metadata
    ]
    key = TensorKey(
        tensor.name, "aggregator", tensor.round_number, tensor.report, tuple(tensor.tags)
    )
    lossless = "compressed" in tensor.tags
    _, array = codec.decompress(
        key, data=tensor.data_bytes, transformer_metadata=metadata, require_lossless=lossless
    )
    return np.asarray(array)


def sent_values(pipeline, tensor, decoded):
    """What the sender meant: each code's table value where a table codes it, else OpenFL's."""
    if pipeline not in TABLE_CODED or "compressed" in tensor.tags:
        return decoded.astype(np.float32).reshape(-1)
    tables = [entry.int_to_float for entry in tensor.transformer_metadata if entry.int_to_float]
    table = tables[0] if tables else {}  # an empty tensor has no levels
    codes = np.frombuffer(gzip.decompress(tensor.data_bytes), dtype=np.float32)
    return np.array([table[int(code)] for code in codes], dtype=np.float32)


def vector(pipeline, settings, name, trained, base):
    """One vector: the message's fields, OpenFL's decoding and the values sent."""
    codec = TensorCodec(PIPELINES[pipeline](**settings))
    np.random.seed(SEED)
    with warnings.catch_warnings():  # KMeans warns when a tensor has fewer levels than clusters
        warnings.simplefilter("ignore")
        tensor = send(codec, name, trained, base)
    decoded = openfl_decoded(codec, tensor)
    sent = sent_values(pipeline, tensor, decoded)
    return {
        "name": f"{pipeline}({', '.join(f'{k}={v}' for k, v in sorted(settings.items()))})/{name}",
        "pipeline": pipeline,
        "settings": settings,
        "tags": list(tensor.tags),
        "lossless": tensor.lossless,
        "metadata": [
            {
                # As a receiver's map iterates: the order OpenFL's decoder replaces codes in.
                "int_to_float": [[key, value] for key, value in entry.int_to_float.items()],
                "int_list": list(entry.int_list),
                "bool_list": list(entry.bool_list),
            }
            for entry in tensor.transformer_metadata
        ],
        "data": base64.b64encode(tensor.data_bytes).decode("ascii"),
        "shape": list(trained.shape),
        "openfl_dtype": str(decoded.dtype),
        "openfl_decoded": b64(decoded.reshape(-1), "<f8"),  # float64 holds float32 exactly
        "sent": b64(sent, "<f4"),
    }


def main():
    """Write every vector to the file named on the command line."""
    out = Path(sys.argv[1])
    vectors = [
        vector(pipeline, settings, name, *arrays()[name])
        for pipeline, settings, names in CASES
        for name in names
    ]
    document = {
        "openfl": version("openfl"),
        "numpy": version("numpy"),
        "scikit-learn": version("scikit-learn"),
        "vectors": vectors,
    }
    out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"{len(vectors)} vectors written to {out}")


if __name__ == "__main__":
    main()
