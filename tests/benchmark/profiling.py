"""`bench.py --profile`: where foedus spends its time around the bytes, client and aggregator."""

from __future__ import annotations

import cProfile
import io
import pstats
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.admission import chunks_within
from aggregator.encoded_model import EncodedModel
from aggregator.fedavg import AVERAGING_THREADS, MappedArraySource
from aggregator.federation import (
    METRIC_TAG,
    Accepted,
    AveragedModel,
    RoundCommit,
    RoundRecord,
    TaskResult,
)
from aggregator.state import DurableState
from aggregator.storage import OutputFolder
from aggregator.upload import receive_upload
from collaborator.client import AggregatorGRPCClient
from plans import load_plan
from plans.runners import Array
from plans.schema import RunnerSettings
from protos import aggregator_pb2
from protos.codec import tensor_field_frame
from protos.results_reader import Head
from protos.stream import (
    CHUNK_BYTES,
    chunk_payloads,
    framed_chunks,
    parse_chunk,
    parse_model_chunk,
)

# isort: split
# The benchmark's own modules, beside this file.
import noop_runner
from harness import (
    AGGREGATOR_ID,
    MIB,
    RUNNER,
    BenchmarkError,
    Run,
    collaborator_names,
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


# -- the steps, one by one ------------------------------------------------------------------------

FEDERATION = "bench-steps"
UNLIMITED = 2**40  # the steps check nothing against the plan's limits
UPLOAD_SECONDS = 3600.0  # chunks_within's deadline: never reached here
_TENSORS_FIELD = aggregator_pb2.TaskResults.TENSORS_FIELD_NUMBER


class Stopwatch:
    """Times named steps in order: `with watch.step("upload", "what", megabytes): ...`."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str, float, float | None]] = []

    @contextmanager
    def step(self, direction: str, label: str, megabytes: float | None) -> Iterator[None]:
        """Time the body as one step over `megabytes` of data (None: a step with no payload)."""
        started = time.perf_counter()
        yield
        self.steps.append((direction, label, time.perf_counter() - started, megabytes))


def stage_breakdown(run: Run) -> list[dict[str, Any]]:
    """Time each step foedus puts around the bytes, calling the very functions client, servicer,
    store and federation call, in their order, in one process (no network): an upload and a
    download of `payload_mb`, then a round close over `round_collaborators` such uploads of
    `round_model_mb`."""
    args = run.args
    model = _noop_model(args.payload_mb, tensors_for(args.payload_mb, args.tensor_mb))
    round_model = _noop_model(args.round_model_mb, args.round_tensors)
    megabytes = noop_runner.model_bytes(model) / MIB
    contributions = args.round_collaborators * noop_runner.model_bytes(round_model) / MIB
    folder = run.work / "steps"
    watch = Stopwatch()
    try:
        with DurableState.open(
            folder / "upload", FEDERATION, lambda: model, max_tensor_bytes=UNLIMITED
        ) as state:
            upload_steps(watch, state, model, "col000")
        download_steps(watch, model)
        round_close_steps(watch, round_model, args.round_collaborators, folder / "round")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    for side, total_mb in (
        ("upload", megabytes),
        ("download", megabytes),
        ("round", contributions),
    ):
        steps = [step for step in watch.steps if step[0] == side]
        rows += [_row(side, label, seconds, mb) for _, label, seconds, mb in steps]
        rows.append(_row(side, "total", sum(step[2] for step in steps), total_mb))
    return rows


def _row(side: str, label: str, seconds: float, megabytes: float | None) -> dict[str, Any]:
    rate = None if megabytes is None else megabytes / seconds
    return {"direction": side, "step": label, "seconds": seconds, "mb": megabytes, "mb_s": rate}


def _noop_model(model_mb: float, tensors: int) -> dict[str, Array]:
    settings = {"model_mb": model_mb, "tensors": tensors}
    return noop_runner.NoopRunner.initial_model(RunnerSettings(RUNNER, 0, settings))


def upload_steps(
    watch: Stopwatch, state: DurableState, model: Mapping[str, Array], collaborator: str
) -> Accepted:
    """One upload: `send_local_task_results`, then `SendLocalTaskResults`, `stage` and `record`."""
    up, mb = "upload", noop_runner.model_bytes(model) / MIB
    header = aggregator_pb2.MessageHeader(
        sender=collaborator, receiver=AGGREGATOR_ID, federation_uuid=FEDERATION
    )
    tensors = train_result(model)
    with watch.step(up, "client: TaskResults head + tensor_field_frame parts (array views)", mb):
        head = aggregator_pb2.TaskResults(header=header, task_name="train", data_size=1)
        parts: list[bytes | memoryview] = [head.SerializeToString()]
        for tensor in tensors:
            parts += tensor_field_frame(
                _TENSORS_FIELD, tensor.name, tensor.array, tags=tensor.tags, report=tensor.report
            ).parts()
        declared = sum(len(part) for part in parts)
    with watch.step(up, "client: framed_chunks (serialized DataStream chunks)", mb):
        wire = list(framed_chunks(parts))
    parts.clear()
    with watch.step(up, "server: parse_chunk of each chunk (payload views)", mb):
        received = [parse_chunk(data) for data in wire]
    assert state.upload_folder is not None  # a DurableState spools into its own folder
    # As the servicer: chunks_within (the upload's deadline) and chunk_payloads feed it.
    label = "server: receive_upload (write + SHA-256, parse, NaN/Inf scan, memmap)"
    with (
        watch.step(up, label, mb),
        closing(chunks_within(iter(received), UPLOAD_SECONDS)) as chunks,
    ):
        upload = receive_upload(
            chunk_payloads(chunks, max_bytes=UNLIMITED),
            state.upload_folder,
            on_head=_accept_head,
            model_dtype=lambda name: model[name].dtype if name in model else None,
            max_tensor_bytes=UNLIMITED,
            expected_bytes=declared,
        )
    received.clear()
    wire.clear()
    result = TaskResult(
        collaborator=collaborator,
        round_number=upload.head.round_number,
        task_name=upload.head.task_name,
        data_size=upload.head.data_size,
        tensors=upload.tensors,
        upload=upload.file,
    )
    with watch.step(up, "server: DurableState.stage (fsync, rename, fsync folder)", mb):
        accepted = state.stage(result)
    with watch.step(up, "server: DurableState.record (SQLite commit)", None):
        state.record(accepted)
    return accepted


def _accept_head(head: Head) -> None:
    """The servicer checks the caller and the round here (in memory, not timed apart)."""


def download_steps(watch: Stopwatch, model: Mapping[str, Array]) -> None:
    """One whole-model download: `GetAggregatedModel`, then `get_aggregated_model`."""
    down, mb = "download", noop_runner.model_bytes(model) / MIB
    collaborator = "col000"
    encoded = EncodedModel(chunk_bytes=CHUNK_BYTES)  # the servicer's size under the bench's limits
    reply = aggregator_pb2.MessageHeader(
        sender=AGGREGATOR_ID, receiver=collaborator, federation_uuid=FEDERATION
    )
    with watch.step(
        down, "server: EncodedModel.chunks -> model_chunks, spooled (once a round)", mb
    ):
        spooled = [encoded.chunks(0, name, array) for name, array in model.items()]
    with watch.step(down, "server: the chunks read back from the spool (each request)", mb):
        wire = [aggregator_pb2.ModelChunk(header=reply).SerializeToString()]
        for chunks in spooled:
            wire += chunks
    with watch.step(down, "client: parse_model_chunk of each chunk (data views)", mb):
        parsed = [parse_model_chunk(data) for data in wire]
    client = AggregatorGRPCClient(  # opens no channel: only its stream assembly is used
        "localhost",
        1,
        aggregator_id=AGGREGATOR_ID,
        federation_uuid=FEDERATION,
        collaborator_name=collaborator,
        tls=False,
        max_tensor_bytes=UNLIMITED,
    )
    with watch.step(down, "client: _assemble_model (empty_tensor, copy chunks in)", mb):
        fetched = client._assemble_model(parsed, list(model), 0)
    if any(not np.array_equal(fetched[name], array) for name, array in model.items()):
        raise BenchmarkError("the model assembled from its chunks differs from the model")


def round_close_steps(
    watch: Stopwatch, model: Mapping[str, Array], collaborators: int, folder: Path
) -> None:
    """A round close over `collaborators` uploads of `model`, each received and kept as above
    (untimed): `decide_close`, `store.load` (as `Federation._averaging`), `commit_round`
    (which averages into the new model's file), then the runtime's `save_last`."""
    side, mb = "round", noop_runner.model_bytes(model) / MIB
    names = collaborator_names(collaborators)
    results = f"{collaborators} x {mb:g} MB"
    with DurableState.open(
        folder / "output", FEDERATION, lambda: model, max_tensor_bytes=UNLIMITED
    ) as state:
        counted = [upload_steps(Stopwatch(), state, model, name) for name in names]
        with watch.step(side, "decide_close (SQLite commit)", None):
            state.decide_close(0, names)
        with watch.step(
            side, f"store.load: read_tensors_file of {results} (map tensors)", mb * collaborators
        ):
            loaded = [state.load(accepted) for accepted in counted]
        sources = {
            result.collaborator: (
                result.data_size,
                MappedArraySource(
                    {t.name: t.array for t in result.tensors if METRIC_TAG not in t.tags}
                ),
            )
            for result in loaded
        }
        record = RoundRecord(
            round_number=0,
            final_validation=False,
            reporters=tuple(names),
            missing=(),
            metrics={},
            seconds=0.0,
            trained=True,
        )
        averaged = AveragedModel(state.recovered.progress.model, sources)
        commit = RoundCommit(record=record, model=averaged, best=None, best_is_round_model=False)
        label = (
            f"DurableState.commit_round: average_sources_into of {results} "
            f"({AVERAGING_THREADS} threads) into the model file, SQLite commit, delete results"
        )
        try:
            with watch.step(side, label, mb * collaborators):
                kept = state.commit_round(commit)
        finally:
            for _, source in sources.values():
                source.close()
        loaded.clear()
        assert kept is not None
        output = OutputFolder(folder / "output")
        label = "OutputFolder.save_last (write_model of the mapped model: a copy in the kernel)"
        with watch.step(side, label, mb):
            output.save_last(kept, 1)


def breakdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The --profile step timings as text."""
    width = max((len(row["step"]) for row in rows), default=0)
    lines = []
    for row in rows:
        rate = row.get("mb_s")
        mb_s = "" if rate is None else f"{rate:8.0f} MB/s"
        line = f"  {row['direction']:<8} {row['step']:<{width}} {row['seconds']:8.4f} s  {mb_s}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "did not finish" if value is None else f"{value:.2f} s"


def print_profile(profile: Mapping[str, Any]) -> None:
    """The --profile findings on stdout."""
    if "steps" in profile:
        print(
            "\nwhere foedus spends time around the bytes (one process, no network; "
            "MB/s: the MB a step handles over its time):"
        )
        print(breakdown_table(profile["steps"]))
    for label in ("aggregator_transfer", "aggregator_round"):
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
