"""The benchmark's transcode part (`tests/benchmark/transcode_cost.py`) on a small model: each
upload code's upload is received and made raw by the real `receive_upload`; no time is checked."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from foedus.aggregator import upload as upload_module

BENCHMARK = Path(__file__).resolve().parent / "benchmark"
CODES = ("none", "lossless", "bfloat16", "int8", "topk")


@pytest.fixture
def transcode_cost(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`transcode_cost`, imported as the benchmark imports its modules (by name, from its folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARK))
    return importlib.import_module("transcode_cost")


def test_each_code_is_received_and_transcoded(transcode_cost: ModuleType, tmp_path: Path) -> None:
    """Every code's figures are numbers (`none`, raw, has no transcode), each coded upload
    smaller than the raw one as its code says, the real `transcode` back in place after."""
    real = upload_module.transcode  # type: ignore[attr-defined]
    figures = transcode_cost.measure(CODES, 0.25, tmp_path / "uploads", repeats=1)
    assert figures["transcode_none_seconds"] is None
    assert figures["transcode_none_base_seconds"] is None  # raw down: the base is the model
    assert figures["transcode_lossless_base_seconds"] is None
    assert figures["transcode_topk_base_seconds"] is None  # top-k's configuration: lossless down
    assert figures["transcode_none_payload_ratio"] == 1.0
    for code in CODES[1:]:
        for figure in ("seconds", "receive_seconds", "fsync_seconds", "encode_seconds"):
            value = figures[f"transcode_{code}_{figure}"]
            assert isinstance(value, float) and value > 0, (code, figure, value)
    for code in ("bfloat16", "int8"):  # a lossy download: the base decoded once a round
        assert figures[f"transcode_{code}_base_seconds"] > 0
    ratios = {code: figures[f"transcode_{code}_payload_ratio"] for code in CODES}
    assert 0.49 < ratios["bfloat16"] < 0.52
    assert 0.25 < ratios["int8"] < 0.27
    assert ratios["topk"] < 0.02
    assert ratios["lossless"] < 0.95  # the XOR of a small update compresses
    assert upload_module.transcode is real  # type: ignore[attr-defined]
    assert list((tmp_path / "uploads").iterdir()) == []  # each upload's files removed


def test_the_synthetic_update_moves_every_weight_a_little(transcode_cost: ModuleType) -> None:
    """The update is a small step from the weights, of every tensor of the real model's shapes."""
    model, step = transcode_cost.model_and_update(0.25)
    assert model.keys() == step.keys()
    for name, values in model.items():
        assert 0 < np.linalg.norm(step[name]) < 0.05 * np.linalg.norm(values), name
