"""`make bench` in its quick mode: it runs and writes every figure; no time is ever checked here."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "tests" / "benchmark" / "bench.py"
# A bound on a hang, not a speed target: the quick run takes about 25 s of CPU, a minute of a
# loaded 2-core machine (its secure and DP rounds came after the first bound of 60 s).
TIMEOUT_SECONDS = 180
# The figures the performance issue asks for, listed here and not imported from the benchmark,
# so that dropping one there fails here.
FIGURES = (
    "raw_grpc_tls_mb_s",
    "upload_mb_s",
    "download_mb_s",
    "upload_ratio",
    "download_ratio",
    "round_seconds",
    "raw_round_seconds",
    "aggregator_peak_rss_mb",
    "rss_over_model",
    "scale_collaborators",
    "scale_round_seconds",
    "scale_errors",
    "payload_mb",
    "secure_round_over_plain",
    "secure_rss_over_model",
    "secure_upload_over_plain",
    "secure_setup_seconds",
    "secure_scale_errors",
    "dp_round_over_plain",
    "transcode_int8_seconds",
    "transcode_lossless_receive_seconds",
)
# The wide-area round's figures: measured when the run may make network namespaces (root).
WAN_FIGURES = (
    "wan_round_seconds",
    "wan_steady_round_seconds",
    "wan_floor_seconds",
    "wan_ratio",
    "wan_steady_ratio",
)

pytestmark = pytest.mark.slow


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def run_bench(*args: str) -> str:
    """`bench.py ARGS` to its end within the time allowed, exit 0; its stdout."""
    # A session of its own: on a timeout the benchmark's aggregators go with it, not on running.
    bench = subprocess.Popen(
        [sys.executable, str(BENCH), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(bench.pid, signal.SIGKILL)
        stdout, stderr = bench.communicate()
        pytest.fail(f"no end within {TIMEOUT_SECONDS} s:\n{stdout}{stderr}")
    assert bench.returncode == 0, stdout + stderr
    return stdout


def test_quick_benchmark_writes_every_figure_as_a_number(tmp_path: Path) -> None:
    """`bench.py --quick --output FILE` exits 0 within TIMEOUT_SECONDS and FILE is strict JSON with every figure a finite number."""
    output = tmp_path / "bench.json"
    stdout = run_bench("--quick", "--output", str(output))
    results = json.loads(output.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    wan_measured = "wan_ratio" in results
    if not wan_measured:
        assert any("wide-area round skipped" in note for note in results["notes"]), results
    for key in FIGURES + (WAN_FIGURES if wan_measured else ()):
        value = results.get(key)
        assert isinstance(value, int | float), f"{key}: {value!r}"
        assert not isinstance(value, bool), f"{key}: {value!r}"
        assert math.isfinite(value), f"{key}: {value!r}"
    assert results["scale_collaborators"] == 20  # --quick's size, so the run was the quick one
    for key in ("secure_round_errors", "secure_setup_errors", "secure_scale_errors"):
        # Each secure round closed trained, with every site in it.
        assert results[key] == 0, (key, results.get(key.replace("errors", "first_error")))
    assert results["secure_model_max_abs_diff"] < 1e-6  # secure and plain FedAvg agree
    # Each DP-FedAvg round and the plain rounds beside it closed trained, with every site in them.
    assert results["dp_round_errors"] == 0, results.get("dp_round_first_error")
    assert all(isinstance(verdict["met"], bool) for verdict in results["targets"].values())
    assert f"written: {output}" in stdout


def test_only_runs_one_part_with_its_figures(tmp_path: Path) -> None:
    """`--only scale` runs the scale round alone: its figures as numbers, no other part's."""
    output = tmp_path / "bench-scale.json"
    run_bench("--quick", "--only", "scale", "--output", str(output))
    results = json.loads(output.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    assert results["only"] == "scale"
    for key in ("scale_collaborators", "scale_round_seconds", "scale_errors"):
        assert isinstance(results[key], int | float), f"{key}: {results[key]!r}"
    assert results["scale_collaborators"] == 20
    assert "raw_grpc_tls_mb_s" not in results
    assert "round_seconds" not in results
    assert results["notes"] == []
