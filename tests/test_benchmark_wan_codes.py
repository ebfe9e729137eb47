"""The wide-area benchmark's real-model runs (`tests/benchmark/wan_codes.py`) without running
them: each code's plan as the plan loader reads it, and the model's size."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import ModuleType

import pytest

from foedus.pki.layout import CertsLayout
from foedus.plans import load_plan

BENCHMARK = Path(__file__).resolve().parent / "benchmark"
MIB = 1024 * 1024
# Each configuration's codes (upload, download), written here and not read from the benchmark.
EXPECTED = {
    "none": ("none", "none"),
    "lossless": ("lossless", "lossless"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "int8": ("int8", "int8"),
    "topk": ("topk", "lossless"),  # the change from the held model, after the first round
}


@pytest.fixture
def benchmark_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`wan_codes`, imported as the benchmark imports its modules (by name, from its folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARK))
    return importlib.import_module("wan_codes")


def test_the_real_model_is_the_size_asked(benchmark_module: ModuleType) -> None:
    """`RealModel.of(50)` has 50 MiB of float32 parameters within 0.1%, its largest tensor in it."""
    model = benchmark_module.RealModel.of(50.0)
    assert abs(model.model_bytes - 50 * MIB) <= 0.001 * 50 * MIB
    assert 0 < model.largest_tensor_bytes < model.model_bytes


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_each_codes_plan_loads_with_its_codes(
    benchmark_module: ModuleType, tmp_path: Path, code: str
) -> None:
    """The plan of each `--wan-codes` run loads, naming its codes both ways."""
    harness = importlib.import_module("harness")
    run = harness.Run(
        args=argparse.Namespace(), work=tmp_path, certs=CertsLayout(tmp_path / "certs")
    )
    model = benchmark_module.RealModel.of(1.0)
    path = harness.write_plan(
        run,
        f"wan-{code}",
        ["col000", "col001"],
        model_mb=1.0,
        tensors=1,
        compression=benchmark_module.CONFIGURATIONS[code] or None,
        runner=model.runner(),
    )
    plan = load_plan(path)
    assert (plan.compression.upload.code.value, plan.compression.download.code.value) == (
        EXPECTED[code]
    )
    assert plan.runner.name == "wan_torch:WideDigitsRunner"
    assert plan.runner.settings["train_images"] == 64  # 2 steps of 32: the round is the transport
    assert plan.aggregator.initial_model is None  # the aggregator makes it from the runner


def test_an_unknown_code_is_refused_by_name(benchmark_module: ModuleType) -> None:
    """`--wan-codes none,zip` names zip and the codes known."""
    with pytest.raises(ValueError, match=r"unknown zip \(known: none, lossless"):
        benchmark_module.codes_option("none,zip")
    assert benchmark_module.codes_option(" none , int8 ,") == ("none", "int8")
    assert benchmark_module.codes_option("") == ()


def test_only_a_dead_benchmarks_namespaces_are_stale(benchmark_module: ModuleType) -> None:
    """`ip netns list` as it prints them: a killed benchmark's namespaces (its pid gone) are
    stale; a running one's, and anyone else's, are not."""
    wan = importlib.import_module("wan")  # beside wan_codes (`benchmark_module`'s folder)
    listing = (
        "foedus-wan-agg-111 (id: 3)\n"
        "foedus-wan-site1-111 (id: 4)\n"
        "foedus-wan-site2-222\n"
        "foedus-wan-agg-222 (id: 5)\n"
        "other-netns-111\n"
        "foedus-wan-agg-x\n"
    )
    stale = wan.stale_namespaces(listing, lambda pid: pid == 222)
    assert stale == ["foedus-wan-agg-111", "foedus-wan-site1-111"]
