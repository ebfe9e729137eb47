"""`bench.py --profile`: where foedus spends its time around the bytes, client and aggregator."""

from __future__ import annotations

import cProfile
import hashlib
import io
import pstats
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.storage import tensors_bytes, write_atomic
from collaborator.client import AggregatorGRPCClient
from plans import load_plan
from plans.runners import Array
from plans.schema import RunnerSettings
from protos import aggregator_pb2, base_pb2
from protos.codec import decode_tensor, encode_tensor
from protos.stream import chunk_bytes, join_chunks

# isort: split
# The benchmark's own modules, beside this file.
import noop_runner
from harness import (
    AGGREGATOR_ID,
    MIB,
    RUNNER,
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
from rounds import measure_round


def profile_client(
    downloader: AggregatorGRPCClient,
    uploader: AggregatorGRPCClient,
    model: Mapping[str, Array],
) -> dict[str, Any]:
    """cProfile of one whole-model download and one upload by the client (this process only)."""
    report: dict[str, Any] = {}
    for label, action in (
        ("client_download", lambda: [downloader.get_aggregated_tensor(n, 0) for n in model]),
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
            for name in model:
                client.get_aggregated_tensor(name, 0)
            client.send_local_task_results(0, "train", 1, train_result(model))
            seconds = time.perf_counter() - started
        finally:
            client.disconnect()
        aggregator.stop()  # SIGTERM: the aggregator stops, the wrapper writes its statistics
    return {
        "seconds_under_profiler": seconds,
        "what": f"one download and one upload of {args.payload_mb:g} MB",
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


class Stopwatch:
    """Times named steps in order: `with watch.step("upload", "what"): ...`."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str, float]] = []

    @contextmanager
    def step(self, direction: str, label: str) -> Iterator[None]:
        """Time the body as one step."""
        started = time.perf_counter()
        yield
        self.steps.append((direction, label, time.perf_counter() - started))


def stage_breakdown(run: Run) -> list[dict[str, Any]]:
    """Time each step foedus puts around the bytes, calling the very functions client and
    servicer call, in their order, on a model of `payload_mb` (one process, no network)."""
    args = run.args
    tensors = tensors_for(args.payload_mb, args.tensor_mb)
    settings = {"model_mb": args.payload_mb, "tensors": tensors}
    model = noop_runner.NoopRunner.initial_model(RunnerSettings(RUNNER, 0, settings))
    megabytes = noop_runner.model_bytes(model) / MIB
    header = aggregator_pb2.MessageHeader(sender="col000", receiver=AGGREGATOR_ID)
    watch = Stopwatch()
    upload_steps(watch, model, header, run.work / "stage-result.pbuf")
    download_steps(watch, model, header)
    rows: list[dict[str, Any]] = [
        {"direction": side, "step": label, "seconds": seconds, "mb_s": megabytes / seconds}
        for side, label, seconds in watch.steps
    ]
    for side in ("upload", "download"):
        total = sum(row["seconds"] for row in rows if row["direction"] == side)
        rows.append(
            {"direction": side, "step": "total", "seconds": total, "mb_s": megabytes / total}
        )
    return rows


UNLIMITED = 2**40


def upload_steps(
    watch: Stopwatch,
    model: Mapping[str, Array],
    header: aggregator_pb2.MessageHeader,
    target: Path,
) -> None:
    """The upload's steps: `send_local_task_results`, then `SendLocalTaskResults` and `stage`."""
    up, limit = "upload", UNLIMITED
    # Each step's input is dropped once used, so memory holds about what the real code holds.
    with watch.step(up, "client: encode_tensor (tobytes + NamedTensor)"):
        named = [encode_tensor(n, a, tags=("trained",)) for n, a in model.items()]
    with watch.step(up, "client: TaskResults(tensors=...) (copies each tensor in)"):
        results = aggregator_pb2.TaskResults(
            header=header, task_name="train", data_size=1, tensors=named
        )
    named.clear()
    with watch.step(up, "client: TaskResults.SerializeToString"):
        payload = results.SerializeToString()
    results.Clear()
    with watch.step(up, "client: chunk_bytes (slice + DataStream)"):
        chunks = list(chunk_bytes(payload))
    payload = b""
    with watch.step(up, "client: gRPC serializes each DataStream"):
        wire = [chunk.SerializeToString() for chunk in chunks]
    chunks.clear()
    with watch.step(up, "server: gRPC parses each DataStream"):
        received = [base_pb2.DataStream.FromString(data) for data in wire]
    wire.clear()
    with watch.step(up, "server: join_chunks (bytearray += ..., bytes())"):
        joined = join_chunks(received, max_bytes=limit)
    received.clear()
    with watch.step(up, "server: TaskResults.ParseFromString"):
        message = aggregator_pb2.TaskResults.FromString(joined)
    joined = b""
    with watch.step(up, "server: decode_tensor (reads data_bytes twice)"):
        arrays = [decode_tensor(tensor, max_bytes=limit) for tensor in message.tensors]
    with watch.step(up, "server: non-finite check (np.isfinite(a).all())"):
        for array in arrays:
            np.isfinite(array).all()
    with watch.step(up, "server: stage: tensors_bytes (encode again)"):
        stored = tensors_bytes(
            (tensor.name, array, frozenset(tensor.tags))
            for tensor, array in zip(message.tensors, arrays, strict=True)
        )
    message.Clear()
    arrays.clear()
    with watch.step(up, "server: stage: sha256"):
        hashlib.sha256(stored).hexdigest()
    with watch.step(up, "server: stage: write_atomic (write + fsync)"):
        write_atomic(target, stored)
    stored = b""
    target.unlink()


def download_steps(
    watch: Stopwatch, model: Mapping[str, Array], header: aggregator_pb2.MessageHeader
) -> None:
    """The download's steps: `GetAggregatedTensor` on each side of the wire."""
    down, limit = "download", UNLIMITED
    with watch.step(down, "server: encode_tensor + GetAggregatedTensorResponse"):
        responses = [
            aggregator_pb2.GetAggregatedTensorResponse(
                header=header, tensor=encode_tensor(n, a, tags=("aggregated", "model"))
            )
            for n, a in model.items()
        ]
    with watch.step(down, "server: gRPC serializes the response"):
        wire = [response.SerializeToString() for response in responses]
    responses.clear()
    with watch.step(down, "client: gRPC parses the response"):
        parsed = [aggregator_pb2.GetAggregatedTensorResponse.FromString(data) for data in wire]
    wire.clear()
    with watch.step(down, "client: decode_tensor (reads data_bytes twice)"):
        for response in parsed:
            decode_tensor(response.tensor, max_bytes=limit)
    parsed.clear()


def breakdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The --profile step timings as text."""
    lines = []
    for row in rows:
        mb_s = f"{row['mb_s']:8.0f} MB/s"
        lines.append(f"  {row['direction']:<8} {row['step']:<58} {row['seconds']:7.3f} s  {mb_s}")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "did not finish" if value is None else f"{value:.2f} s"


def print_profile(profile: Mapping[str, Any]) -> None:
    """The --profile findings on stdout."""
    if "steps" in profile:
        print("\nwhere foedus spends time around the bytes (one process, no network):")
        print(breakdown_table(profile["steps"]))
    for label in ("aggregator_transfer", "aggregator_round"):
        server = profile.get(label)
        if not isinstance(server, dict):
            continue
        print(
            f"\ncProfile of the aggregator in {server['what']} "
            f"({_seconds(server['seconds_under_profiler'])} under the profiler; main thread and every "
            "GetAggregatedTensor and SendLocalTaskResults call merged, so concurrent calls add "
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
