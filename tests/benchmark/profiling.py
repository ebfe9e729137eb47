"""`bench.py --profile`: where foedus spends its time around the bytes, client and aggregator.

cProfiles of the real code as it runs (the client in this process, the aggregator as a process
under `profiled_aggregator.py`), so they follow the code as it changes. (An earlier timing of each
step, the servicer's and the close's calls copied here in their order, went stale as they
changed, and was removed.)
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from foedus.collaborator.client import AggregatorGRPCClient
from foedus.plans import load_plan
from foedus.plans.runners import Array

# isort: split
# The benchmark's own modules, beside this file.
import noop_runner
from harness import (
    MIB,
    BenchmarkError,
    Run,
    limits_for,
    make_client,
    start_aggregator,
    tensor_byte_sizes,
    tensors_for,
    train_result,
    write_plan,
)
from profiled_aggregator import PROFILED_RPCS
from rounds import measure_round


def profile_client(
    downloader: AggregatorGRPCClient,
    uploader: AggregatorGRPCClient,
    model: Mapping[str, Array],
) -> dict[str, Any]:
    """cProfile of one whole-model download and one upload by the client (this process only)."""
    report: dict[str, Any] = {}
    for label, action in (
        ("client_download", lambda: downloader.get_aggregated_model(list(model), 0)),
        (
            "client_upload",
            lambda: uploader.send_local_task_results(0, "train", 1, train_result(model)),
        ),
    ):
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.runcall(action)
        elapsed = time.perf_counter() - started
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(12)
        report[label] = {"seconds": elapsed, "top_tottime": _trim_stats(text.getvalue())}
    return report


def _trim_stats(text: str) -> list[str]:
    """The rows of a pstats listing, without its preamble and blank lines."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return [line.rstrip() for line in lines[start:] if line.strip()]


def profile_transfer(run: Run, names: Sequence[str]) -> dict[str, Any]:
    """One whole-model download and one upload of `payload_mb`, the aggregator under cProfile."""
    args = run.args
    tensors = tensors_for(args.payload_mb, args.tensor_mb)
    size = int(args.payload_mb * MIB)
    limits = limits_for(max(tensor_byte_sizes(size, tensors)), size)
    members = names[:2]
    plan_path = write_plan(
        run,
        "transfer-profiled",
        members,
        model_mb=args.payload_mb,
        tensors=tensors,
        limits=limits,
    )
    plan = load_plan(plan_path)
    model = noop_runner.NoopRunner.initial_model(plan.runner)
    stats_file = plan_path.parent / "aggregator.prof"
    aggregator, port = start_aggregator(plan_path, profile_to=stats_file)
    with aggregator:
        client = make_client(plan, members[0], port)
        try:
            client.ping()
            started = time.perf_counter()
            client.get_aggregated_model(list(model), 0)
            client.send_local_task_results(0, "train", 1, train_result(model))
            seconds = time.perf_counter() - started
        finally:
            client.disconnect()
        aggregator.stop()  # SIGTERM: the aggregator stops, the wrapper writes its statistics
    return {
        "seconds_under_profiler": seconds,
        "what": f"one download (GetAggregatedModel) and one upload of {args.payload_mb:g} MB",
        "rpcs": list(PROFILED_RPCS),
        "top_tottime": top_functions(stats_file),
    }


def profile_round(run: Run, names: Sequence[str]) -> dict[str, Any]:
    """The round again, its aggregator under cProfile: its costliest functions by own time."""
    args = run.args
    stats_file = run.work / "round-profiled" / "aggregator.prof"
    outcome = measure_round(
        run,
        "round-profiled",
        names[: args.round_collaborators],
        model_mb=args.round_model_mb,
        tensors=args.round_tensors,
        profile_to=stats_file,
    )
    return {
        "seconds_under_profiler": outcome.round_seconds,
        "what": f"the round ({args.round_collaborators} x {args.round_model_mb:g} MB)",
        "rpcs": list(PROFILED_RPCS),
        "top_tottime": top_functions(stats_file),
    }


def top_functions(stats_file: Path) -> list[dict[str, Any]]:
    """The costliest functions by own time in a profiled aggregator's statistics, waits left out."""
    if not stats_file.exists():
        raise BenchmarkError(f"the profiled aggregator wrote no statistics to {stats_file}")
    stats = pstats.Stats(str(stats_file))
    rows = []
    for (path, line, function), (_, calls, own, total, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(path).name}:{line}({function})" if line else function
        if any(word in where for word in WAITS):
            continue
        rows.append({"function": where, "calls": calls, "tottime": own, "cumtime": total})
    rows.sort(key=lambda row: row["tottime"], reverse=True)
    return rows[:PROFILE_ROWS]


WAITS = ("acquire' of '_thread.lock", "threading.py", "queue.py")
PROFILE_ROWS = 15


def _seconds(value: float | None) -> str:
    return "did not finish" if value is None else f"{value:.2f} s"


def print_profile(profile: Mapping[str, Any]) -> None:
    """The --profile findings on stdout."""
    for label in ("aggregator_transfer", "aggregator_round", "aggregator_secure_round"):
        server = profile.get(label)
        if not isinstance(server, dict):
            continue
        rpcs = " and ".join(server.get("rpcs", PROFILED_RPCS))
        print(
            f"\ncProfile of the aggregator in {server['what']} "
            f"({_seconds(server['seconds_under_profiler'])} under the profiler; main thread and every "
            f"{rpcs} call merged, other RPCs left out, so concurrent calls add "
            "up and GIL waits count; lock and queue waits left out):"
        )
        print(f"  {'tottime':>8} {'cumtime':>8} {'calls':>7}  function")
        for row in server["top_tottime"]:
            print(
                f"  {row['tottime']:8.3f} {row['cumtime']:8.3f} {row['calls']:7d}  {row['function']}"
            )
    for label in ("client_download", "client_upload"):
        if label in profile:
            print(
                f"\ncProfile of one {label.replace('_', ' ')} ({profile[label]['seconds']:.2f} s), by tottime:"
            )
            print("\n".join(profile[label]["top_tottime"]))
