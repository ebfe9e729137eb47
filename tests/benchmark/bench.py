"""`make bench`: foedus's transport against plain gRPC over mutual TLS, on this machine, in one run.

A benchmark, not a test: it prints figures and writes them to a JSON file, and exits 0 whether or
not the targets are met (non-zero only when something crashed). Every figure is measured in the
same run, with mutual TLS and certificates from our own `pki` (made in a temporary folder, their
time reported apart). MB means MiB (2**20 bytes) throughout. Throughputs are the best of
`repeats` samples, each after an untimed warm-up of the same operation.

Phases, in order:

1. raw: a plain grpcio server (`raw_grpc.py`, its own process, no foedus code) with the same
   TLS files; a client stream of `payload_mb` in 2 MiB messages (`raw_grpc_tls_mb_s`, the limit
   to compare with), a server stream and one unary message per tensor of the same size; then
   `round_collaborators` threads each downloading and uploading `round_model_mb` at once
   (`raw_round_seconds`). Then the disk where the aggregator keeps its state: `payload_mb`
   written and fsynced (`disk_write_mb_s`), and the time the round's results alone take at
   that rate (`round_disk_floor_seconds`): accepted results are on disk before the OK, a floor
   raw gRPC, which stores nothing, does not have.
2. transfer: `aggregator start` as a process, started from a model of `payload_mb` (the no-op
   runner's, written to a file: `harness.write_plan` says why);
   one `AggregatorGRPCClient` fetches the model in one streamed call (`download_mb_s`,
   `GetAggregatedModel`) and sends a train result
   of the same size (`upload_mb_s`; each sample by another collaborator, so each is a first
   upload, stored durably as the aggregator does). After those downloads, raw gRPC fetches the
   same bytes into new memory (`raw_kept_download_mb_s`); in turns with those uploads, it sends
   them to a server that writes them to a file and fsyncs it before it answers
   (`raw_durable_upload_mb_s`, the uploads meeting the page cache and memory in the same
   state): what keeping the bytes costs on this machine before any of foedus's work.
3. probe (not with --quick): one tensor of `payload_mb` under the plan's default limits: can it
   be downloaded, and uploaded, at all?
4. round: `round_collaborators` threads in this process, each its own client and certificate
   running the real collaborator loop with the no-op runner, one round of `train` on a
   `round_model_mb` model; right after it, the raw round again with each download kept in new
   memory and each upload fsynced (`raw_durable_round_seconds`: the round's bytes kept, as any
   federation must keep them, before any FL work). `round_seconds` from the first download
   to the aggregator's "round 1/1" line (printed once the new model is averaged, committed
   and saved), the aggregator's peak RSS (`VmHWM`) then. A collaborator's next `GetTasks`
   after its upload is held until that is read (it would be a long poll on the server,
   costing no CPU).
5. steady: the same round as the second of a two-round federation (`steady_round_seconds`,
   not a target): what the first round pays once, and later rounds do not.
6. scale: `scale_collaborators` threads and a `scale_model_kb` model, the loop unheld, so the
   polling of those that have uploaded is part of the load.
7. secure (`secure_cost.py`): the round's sizes as a plain round and then a secure one, in turns
   `secure_pairs` times, the fastest of each kind kept
   (`secure_round_over_plain`, the aggregator's peak memory over the model, the masked upload's
   bytes over the plain one's, the two final models compared); the key setup and share exchange
   of a secure round of `secure_setup_collaborators` sites (`secure_setup_seconds`); a secure
   round of `secure_scale_collaborators` sites with `secure_neighbours` (its errors).
8. dp (`dp_cost.py`): the round's sizes as a plain round and then a DP-FedAvg one, in turns
   `dp_pairs` times, the fastest of each kind kept (`dp_round_over_plain`; the aggregator's close
   after the last upload of each, where the clipping and the noise are).
9. transcode (`transcode_cost.py`, not a target): one upload of the wide-area model's shapes
   per upload code, received by `receive_upload` without a socket: the aggregator's `transcode`
   of it into the raw upload (`transcode_<code>_seconds`), the whole receive, the site's encoding.
10. wide area (`wan.py`; needs root, skipped with a note otherwise): 4 sites, each a collaborator
    process in a network namespace of its own behind a veth link shaped to `wan_rate_mbit` each
    way, with `wan_rtt_ms` of round trip added by a delay line; `wan_rounds` rounds of a
    `wan_model_mb` model. `wan_round_seconds` (the first, from the start, nothing connected yet)
    and `wan_steady_round_seconds` (the later ones) against `wan_floor_seconds`, the time the model
    takes down and up one site's link at that rate. Then (`wan_codes.py`; needs `.venv-torch`,
    skipped with a note otherwise) the same links with a real model's update: a wide MLP of about
    `wan_model_mb` trained one local epoch a round at each site on `wan_train_images` images of its
    shard of the digits, one federation per code of `--wan-codes` (its plan's `compression`
    section): `wan_<code>_ratio`, its steady round over the uncompressed floor
    `wan_real_floor_seconds`.

`--only PART` runs one part alone (any but transfer, whose ratios need raw's figures) and writes
`build/bench-PART.json` unless `--output` says otherwise; a whole run writes every key as before.

`--profile` adds a cProfile of one client download and one upload, and the aggregator under
cProfile (`profiled_aggregator.py`) for one transfer and for the round, to show where the time
goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import google.protobuf
import grpc
import numpy as np

from foedus.aggregator.file_limit import files_needed, raise_open_file_limit
from foedus.collaborator.errors import ClientError, RequestRejectedError
from foedus.pki.layout import CertsLayout
from foedus.pki.local import setup_local_federation
from foedus.plans import load_plan

# isort: split
# The benchmark's own modules, beside this file.
import dp_cost
import noop_runner
import raw_grpc
import secure_cost
import transcode_cost
import wan
import wan_codes
from harness import (
    KIB,
    MIB,
    REPO,
    BenchmarkError,
    Run,
    collaborator_names,
    cpu_seconds,
    cpu_spent,
    limits_for,
    make_client,
    own_cpu_seconds,
    peak_rss_mb,
    rate,
    samples,
    say,
    start_aggregator,
    start_raw_server,
    tensor_byte_sizes,
    tensors_for,
    timed,
    train_result,
    write_plan,
)
from profiling import (
    print_profile,
    profile_client,
    profile_round,
    profile_transfer,
)
from rounds import measure_round

# --quick: the test suite's smoke run, a few seconds; options given on the line still win.
QUICK = {
    "payload_mb": 8.0,
    "tensor_mb": 2.0,
    "round_collaborators": 3,
    "round_model_mb": 4.0,
    "scale_collaborators": 20,
    "secure_pairs": 1,
    "secure_setup_collaborators": 6,
    "secure_scale_collaborators": 12,
    "secure_neighbours": 4,
    "dp_pairs": 1,
    "wan_model_mb": 4.0,
    "wan_rounds": 2,
    "wan_codes": (),  # a real model's runs need .venv-torch and minutes: not in the smoke run
    "round_timeout": 60.0,
    "probe": False,
}


# The parts of a run, in order; `--only` runs one of those that stand alone (transfer's ratios
# need raw's figures).
PARTS = (
    "raw",
    "disk",
    "transfer",
    "probe",
    "round",
    "steady",
    "scale",
    "secure",
    "dp",
    "transcode",
    "wan",
)
ALONE = tuple(part for part in PARTS if part != "transfer")


# The figures the issue asks for; a run that could not measure one says so in its notes.
REQUIRED_KEYS = (
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
    "secure_round_over_plain",
    "secure_rss_over_model",
    "secure_upload_over_plain",
    "secure_setup_seconds",
    "secure_scale_errors",
    "dp_round_over_plain",
)


# -- options -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line; `--quick` changes the defaults of the options not given."""
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark foedus's transport against plain gRPC over mutual TLS on this "
        "machine; prints a table and writes JSON. Exit 0 even when targets are missed.",
    )
    add = parser.add_argument
    add(
        "--output",
        type=Path,
        default=None,
        help="JSON file to write (build/bench.json; with --only PART, build/bench-PART.json)",
    )
    add(
        "--only",
        choices=ALONE,
        default=None,
        help="run this part alone (its figures, as in a whole run), e.g. --only scale",
    )
    add("--quick", action="store_true", help="small sizes for a smoke run (well under 40 s)")
    add("--payload-mb", type=float, default=256.0, help="upload/download size (default 256)")
    add("--tensor-mb", type=float, default=64.0, help="largest tensor of that model (default 64)")
    add("--repeats", type=int, default=3, help="samples per throughput figure; best is kept")
    add("--round-collaborators", type=int, default=8, help="collaborators of the round (8)")
    add("--round-model-mb", type=float, default=100.0, help="model size of the round (100)")
    add("--round-tensors", type=int, default=4, help="tensors of the round's model (4)")
    add("--scale-collaborators", type=int, default=2000, help="collaborators of the scale round")
    add("--scale-model-kb", type=float, default=10.0, help="model size of the scale round (10)")
    add(
        "--secure-bits",
        type=int,
        choices=(16, 32, 64),
        default=32,
        help="the ring of the secure rounds (secure_aggregation.bits, 32)",
    )
    add(
        "--secure-pairs",
        type=int,
        default=2,
        help="plain and secure rounds measured in turns; the fastest of each kind is kept (2)",
    )
    add(
        "--secure-setup-collaborators",
        type=int,
        default=100,
        help="sites of the secure round whose key setup and share exchange are timed (100)",
    )
    add(
        "--secure-scale-collaborators",
        type=int,
        default=500,
        help="sites of the secure round with neighbours (500)",
    )
    add(
        "--secure-neighbours",
        type=int,
        default=16,
        help="secure_aggregation.neighbours of that round (16; even, below the sites)",
    )
    add(
        "--dp-pairs",
        type=int,
        default=2,
        help="plain and DP-FedAvg rounds measured in turns; the fastest of each kind is kept (2)",
    )
    add(
        "--wan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the wide-area round (needs root; skipped with a note otherwise)",
    )
    add("--wan-model-mb", type=float, default=50.0, help="model size of the wide-area round (50)")
    add("--wan-rounds", type=int, default=3, help="rounds of the wide-area federation (3)")
    add("--wan-rate-mbit", type=float, default=200.0, help="each site's link, each way (200)")
    add("--wan-rtt-ms", type=float, default=40.0, help="round trip the delay line adds (40)")
    add(
        "--wan-codes",
        type=_codes,
        default=wan_codes.DEFAULT_CODES,
        help="the wide-area rounds of a real model, one federation per code, comma-separated, "
        f"of {', '.join(wan_codes.CONFIGURATIONS)} ({','.join(wan_codes.DEFAULT_CODES)}; "
        "'' for none; a code the plan loader refuses is skipped with a note)",
    )
    add(
        "--wan-train-images",
        type=int,
        default=wan_codes.TRAIN_IMAGES,
        help="the real model's images a site trains on each round, the first of its shard "
        f"({wan_codes.TRAIN_IMAGES}: {wan_codes.TRAIN_IMAGES // wan_codes.BATCH_SIZE} steps; "
        "0 for the whole shard, ~360 images)",
    )
    add(
        "--wan-torch-python",
        default=str(REPO / ".venv-torch" / "bin" / "python"),
        help="the interpreter with PyTorch for those rounds (.venv-torch's: make torch-env)",
    )
    add("--round-timeout", type=float, default=600.0, help="give up on a round after this")
    add(
        "--probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="try one tensor of payload-mb under the default limits (off with --quick)",
    )
    add("--profile", action="store_true", help="cProfile the client and the aggregator")
    add("--keep", action="store_true", help="keep the temporary folder (certificates, logs)")
    return parser


def _codes(text: str) -> tuple[str, ...]:
    """`--wan-codes`, as argparse wants a type: ArgumentTypeError for an unknown code."""
    try:
        return wan_codes.codes_option(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line, with the quick defaults when `--quick` is given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    problems = [
        f"--{name.replace('_', '-')} must be positive"
        for name in (
            "payload_mb",
            "tensor_mb",
            "repeats",
            "round_collaborators",
            "round_model_mb",
            "round_tensors",
            "scale_collaborators",
            "scale_model_kb",
            "secure_pairs",
            "secure_setup_collaborators",
            "secure_scale_collaborators",
            "secure_neighbours",
            "dp_pairs",
            "wan_model_mb",
            "wan_rounds",
            "wan_rate_mbit",
            "round_timeout",
        )
        if not getattr(args, name) > 0
    ]
    if args.wan_train_images < 0:
        problems.append("--wan-train-images must be 0 (the whole shard) or positive")
    if problems:
        parser.error("; ".join(problems))
    if args.output is None:
        name = "bench.json" if args.only is None else f"bench-{args.only}.json"
        args.output = REPO / "build" / name
    return args


# -- phase 1: raw gRPC ---------------------------------------------------------------------------


def measure_raw(run: Run, names: Sequence[str]) -> None:
    """Raw gRPC over mutual TLS: stream up, stream down, unary down, and the round's traffic."""
    args = run.args
    server, port = start_raw_server(run.certs, run.work / "raw")
    with server:
        client = raw_client_of(run, port, names[0])
        try:
            run.results.update(raw_throughput(client, args))
        finally:
            client.close()
        say(
            f"raw gRPC/TLS: up {run.results['raw_grpc_tls_mb_s']:.0f} MB/s, down (stream) "
            f"{run.results['raw_grpc_tls_download_mb_s']:.0f} MB/s, down (unary, one message "
            f"per tensor) {run.results['raw_grpc_tls_unary_download_mb_s']:.0f} MB/s"
        )
        run.results["raw_round_seconds"] = raw_round(
            run, port, names[: args.round_collaborators], int(args.round_model_mb * MIB)
        )
        say(
            f"raw gRPC/TLS round: {args.round_collaborators} x {args.round_model_mb:g} MB down "
            f"and up in {run.results['raw_round_seconds']:.2f} s"
        )


def measure_disk(run: Run) -> None:
    """The disk's own limit, where the aggregator keeps its state: write `payload_mb` and fsync.

    An accepted upload is on disk before the aggregator answers, so this is a floor under every
    upload and round figure that raw gRPC, which stores nothing, does not have.
    """
    args = run.args
    size = int(args.payload_mb * MIB)
    block = raw_grpc.pattern(min(size, 4 * MIB))
    path = run.work / "disk-probe"
    seconds: list[float] = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        with path.open("wb") as file:
            for start in range(0, size, len(block)):
                file.write(block[: size - start])
            file.flush()
            os.fsync(file.fileno())
        seconds.append(time.perf_counter() - started)
        path.unlink()
    run.results["disk_write_mb_s"] = rate(args.payload_mb, seconds)
    round_bytes = args.round_collaborators * args.round_model_mb
    run.results["round_disk_floor_seconds"] = round_bytes / run.results["disk_write_mb_s"]
    say(
        f"disk: write + fsync {run.results['disk_write_mb_s']:.0f} MB/s; the round's "
        f"{round_bytes:g} MB of results alone take {run.results['round_disk_floor_seconds']:.2f} s"
    )


def raw_throughput(client: raw_grpc.RawClient, args: argparse.Namespace) -> dict[str, Any]:
    """Best-of-`repeats` MB/s of `payload_mb` up (client stream), down (server stream), and down
    as one unary message per tensor of the foedus model of that size."""
    size = int(args.payload_mb * MIB)
    tensor_sizes = tensor_byte_sizes(size, tensors_for(args.payload_mb, args.tensor_mb))
    payload = raw_grpc.pattern(size)

    def download_unary(_: int) -> None:
        for part in tensor_sizes:
            _expect(client.download_unary(part), part)

    client.upload(b"x")  # the TLS handshake, outside every timing
    # One untimed run of each first: the server builds its buffer, the flow-control windows grow.
    client.upload(payload)
    client.download(size)
    download_unary(0)
    up = samples(args.repeats, lambda _: _expect(client.upload(payload), size))
    down = samples(args.repeats, lambda _: _expect(client.download(size), size))
    unary = samples(args.repeats, download_unary)
    return {
        "raw_grpc_tls_mb_s": rate(args.payload_mb, up),
        "raw_grpc_tls_download_mb_s": rate(args.payload_mb, down),
        "raw_grpc_tls_unary_download_mb_s": rate(args.payload_mb, unary),
        "raw_upload_seconds": up,
        "raw_download_seconds": down,
        "raw_unary_download_seconds": unary,
    }


def _expect(got: int, wanted: int) -> None:
    if got != wanted:
        raise BenchmarkError(f"raw gRPC moved {got} bytes, expected {wanted}")


def raw_round(
    run: Run, port: int, names: Sequence[str], size: int, *, durable: bool = False
) -> float:
    """Wall time of `names` clients each downloading then uploading `size` bytes at once.

    `durable`: each keeps its download in new memory, and each upload is fsynced to a file
    before it is answered: what the round's bytes cost on this machine before any FL work.
    """
    clients = [raw_client_of(run, port, name) for name in names]
    payload = raw_grpc.pattern(size)
    go = threading.Event()
    errors: list[str] = []

    def work(client: raw_grpc.RawClient) -> None:
        try:
            go.wait()
            if durable:
                _expect(client.download_into(size), size)
                _expect(client.upload_durable(payload), size)
            else:
                _expect(client.download(size), size)
                _expect(client.upload(payload), size)
        except Exception as error:  # counted, reported below
            errors.append(repr(error))

    try:
        for client in clients:
            client.upload(b"x")  # handshakes first, outside the timing
        threads = [threading.Thread(target=work, args=(client,)) for client in clients]
        for thread in threads:
            thread.start()
        started = time.perf_counter()
        go.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()
    if errors:
        raise BenchmarkError(f"raw round failed: {errors[0]}")
    return elapsed


# -- phase 2: foedus upload and download ---------------------------------------------------------


def measure_transfer(run: Run, names: Sequence[str]) -> None:
    """foedus's client against `aggregator start`: fetch the whole model, send a result of its size."""
    args = run.args
    tensors = tensors_for(args.payload_mb, args.tensor_mb)
    size = int(args.payload_mb * MIB)
    largest = max(tensor_byte_sizes(size, tensors))
    # The timed uploads, an untimed warm-up upload, one for --profile, and one collaborator
    # that never uploads, so the round never closes while measuring.
    members = names[: args.repeats + 3]
    plan_path = write_plan(
        run,
        "transfer",
        members,
        model_mb=args.payload_mb,
        tensors=tensors,
        limits=limits_for(largest, size),
    )
    plan = load_plan(plan_path)
    model = noop_runner.NoopRunner.initial_model(plan.runner)
    megabytes = noop_runner.model_bytes(model) / MIB
    result = train_result(model)
    payload = raw_grpc.pattern(noop_runner.model_bytes(model))
    aggregator, port = start_aggregator(plan_path)
    raw_server, raw_port = start_raw_server(run.certs, run.work / "transfer-raw")
    with aggregator, raw_server:
        clients = [make_client(plan, name, port) for name in members]
        raw_client = raw_client_of(run, raw_port, names[0])
        try:
            for client in clients:
                client.ping()  # TLS handshakes outside the timings

            fetched = clients[0].get_aggregated_model(list(model), 0)
            if any(not np.array_equal(fetched[name], model[name]) for name in model):
                raise BenchmarkError("the downloaded model differs from the aggregator's")
            del fetched
            down = samples(args.repeats, lambda _: clients[0].get_aggregated_model(list(model), 0))
            # Then raw gRPC keeping the same bytes in new memory; foedus's downloads stay in a
            # row, as in every earlier run of this benchmark, so their figure stays comparable.
            raw_client.download_into(len(payload))
            kept = samples(
                args.repeats,
                lambda _: _expect(raw_client.download_into(len(payload)), len(payload)),
            )
            clients[args.repeats].send_local_task_results(0, "train", 1, result)  # warm-up
            raw_client.upload_durable(payload)
            # Each foedus upload beside one of raw gRPC storing the same bytes durably, in turns,
            # so that both meet the machine (page cache, memory) in the same state.
            up: list[float] = []
            durable: list[float] = []
            for sender in clients[: args.repeats]:
                up.append(timed(partial(sender.send_local_task_results, 0, "train", 1, result)))
                durable.append(
                    timed(lambda: _expect(raw_client.upload_durable(payload), len(payload)))
                )
            if args.profile:
                profile = profile_client(clients[0], clients[args.repeats + 1], model)
                run.results.setdefault("profile", {}).update(profile)
        finally:
            raw_client.close()
            for client in clients:
                client.disconnect()
        run.results["transfer_aggregator_peak_rss_mb"] = peak_rss_mb(aggregator.pid)
    run.results.update(
        download_mb_s=rate(megabytes, down),
        upload_mb_s=rate(megabytes, up),
        raw_durable_upload_mb_s=rate(megabytes, durable),
        raw_kept_download_mb_s=rate(megabytes, kept),
        download_seconds=down,
        upload_seconds=up,
        raw_durable_upload_seconds=durable,
        raw_kept_download_seconds=kept,
        transfer_tensors=tensors,
        transfer_limits=limits_for(largest, size),
    )
    raw = run.results["raw_grpc_tls_mb_s"]
    run.results["download_ratio"] = run.results["download_mb_s"] / raw
    run.results["upload_ratio"] = run.results["upload_mb_s"] / raw
    # The upload against the same bytes fsynced by raw gRPC: what foedus adds to durability.
    run.results["upload_ratio_vs_raw_durable"] = (
        run.results["upload_mb_s"] / run.results["raw_durable_upload_mb_s"]
    )
    run.results["download_ratio_vs_raw_kept"] = (
        run.results["download_mb_s"] / run.results["raw_kept_download_mb_s"]
    )
    # How much of the download's gap is gRPC's own cost of large unary messages:
    run.results["download_ratio_vs_raw_unary"] = (
        run.results["download_mb_s"] / run.results["raw_grpc_tls_unary_download_mb_s"]
    )
    say(
        f"foedus: down {run.results['download_mb_s']:.0f} MB/s, up "
        f"{run.results['upload_mb_s']:.0f} MB/s ({tensors} tensors of <= {largest / MIB:g} MB); "
        f"raw gRPC down into new memory {run.results['raw_kept_download_mb_s']:.0f} MB/s, up "
        f"into a file fsynced before the answer (in turns with foedus) "
        f"{run.results['raw_durable_upload_mb_s']:.0f} MB/s"
    )


def raw_client_of(run: Run, port: int, name: str) -> raw_grpc.RawClient:
    """A raw gRPC client with collaborator `name`'s certificate, to the raw server's `port`."""
    certs = run.certs
    return raw_grpc.RawClient(
        f"localhost:{port}",
        certs.ca_bundle,
        certs.collaborator_cert(name),
        certs.collaborator_key(name),
    )


# -- phase 3: what the limits allow --------------------------------------------------------------


def probe_single_tensor(run: Run, names: Sequence[str]) -> None:
    """One tensor of `payload_mb` under the default limits: can it travel at all, each way?"""
    args = run.args
    members = names[:2]
    plan_path = write_plan(run, "probe", members, model_mb=args.payload_mb, tensors=1)
    plan = load_plan(plan_path)
    model = noop_runner.NoopRunner.initial_model(plan.runner)
    aggregator, port = start_aggregator(plan_path)
    limit = plan.limits.max_message_bytes
    with aggregator:
        client = make_client(plan, members[0], port)
        try:
            client.ping()
            name = next(iter(model))
            try:
                seconds = timed(lambda: client.get_aggregated_model([name], 0))
                run.results["single_tensor_download_ok"] = 1
                run.results["single_tensor_download_seconds"] = seconds
            except ClientError as error:
                run.results["single_tensor_download_ok"] = 0
                run.results["single_tensor_download_error"] = str(error)
                run.note(
                    f"one {args.payload_mb:g} MB tensor cannot be downloaded under the default "
                    f"limits ({_short(error)})"
                )
            try:
                client.get_aggregated_tensor(name, 0)
                run.results["single_tensor_unary_download_ok"] = 1
            except ClientError as error:
                run.results["single_tensor_unary_download_ok"] = 0
                run.note(
                    f"as one unary message (OpenFL's GetAggregatedTensor), a {args.payload_mb:g} "
                    f"MB tensor is over limits.max_message_bytes ({limit / MIB:g} MB): "
                    f"{_short(error)}; foedus collaborators stream it instead"
                )
            try:
                seconds = timed(
                    lambda: client.send_local_task_results(0, "train", 1, train_result(model))
                )
                run.results["single_tensor_upload_ok"] = 1
                run.results["single_tensor_upload_seconds"] = seconds
            except ClientError as error:
                run.results["single_tensor_upload_ok"] = 0
                run.results["single_tensor_upload_error"] = str(error)
                run.note(f"one {args.payload_mb:g} MB tensor cannot be uploaded: {_short(error)}")
        finally:
            client.disconnect()


def _short(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, RequestRejectedError):
        text = f"{error.code.name}: {error.details}"
    return text if len(text) <= 160 else text[:157] + "..."


# -- phases 4 and 5: whole rounds ----------------------------------------------------------------


def cpu_figures(prefix: str, seconds: tuple[float, float] | None) -> dict[str, float | None]:
    """`PREFIX_cpu_seconds` (user + system) and `PREFIX_sys_seconds` of a (user, system) pair."""
    if seconds is None:
        return {f"{prefix}_cpu_seconds": None, f"{prefix}_sys_seconds": None}
    return {f"{prefix}_cpu_seconds": sum(seconds), f"{prefix}_sys_seconds": seconds[1]}


def measure_round_phase(run: Run, names: Sequence[str]) -> None:
    """The 8-collaborator round of a 100 MB model, and the aggregator's memory in it; right after
    it, the same bytes moved by raw gRPC, each download kept in new memory and each upload
    fsynced (`raw_durable_round_seconds`).

    Raw goes second: it then meets the memory foedus's round has just freed, which favours raw,
    and foedus's round meets the machine as it did before this comparison was added.
    """
    args = run.args
    outcome = measure_round(
        run,
        "round",
        names[: args.round_collaborators],
        model_mb=args.round_model_mb,
        tensors=args.round_tensors,
    )
    rss = outcome.peak_rss_mb
    run.results.update(
        round_seconds=outcome.round_seconds,
        round_wall_seconds=outcome.wall_seconds,
        round_aggregator_reported_seconds=outcome.aggregator_seconds,
        round_connect_seconds=outcome.connect_seconds,
        round_download_seconds_max=outcome.download_seconds_max,
        round_upload_seconds_max=outcome.upload_seconds_max,
        round_close_after_last_upload_seconds=outcome.close_after_last_upload_seconds,
        **cpu_figures("round_aggregator", outcome.aggregator_cpu_seconds),
        **cpu_figures("round_client", outcome.client_cpu_seconds),
        round_aggregator_rss_until_last_download_mb=outcome.rss_until_last_download_mb,
        round_aggregator_rss_until_last_upload_mb=outcome.rss_until_last_upload_mb,
        round_aggregator_rss_after_last_upload_mb=outcome.rss_after_last_upload_mb,
        round_errors=len(outcome.errors),
        round_client_warnings=outcome.warnings,
        round_aggregator_exit=outcome.aggregator_exit,
        aggregator_peak_rss_mb=rss,
        rss_over_model=None if rss is None else rss / args.round_model_mb,
    )
    server, port = start_raw_server(run.certs, run.work / "round-raw")
    with server:
        server_cpu, client_cpu = cpu_seconds(server.pid), own_cpu_seconds()
        raw_durable = raw_round(
            run,
            port,
            names[: args.round_collaborators],
            int(args.round_model_mb * MIB),
            durable=True,
        )
        server_cpu_end = cpu_seconds(server.pid)
        client_used = cpu_spent(own_cpu_seconds(), client_cpu)
    run.results.update(
        raw_durable_round_seconds=raw_durable,
        round_over_raw_durable_round=(
            None if outcome.round_seconds is None else outcome.round_seconds / raw_durable
        ),
        # Its CPU (the clients' handshakes included) beside the round's: both are CPU-bound here.
        **cpu_figures(
            "raw_durable_round_server",
            None
            if server_cpu is None or server_cpu_end is None
            else cpu_spent(server_cpu_end, server_cpu),
        ),
        **cpu_figures("raw_durable_round_client", client_used),
    )
    if outcome.errors:
        run.results["round_first_error"] = outcome.errors[0]
    if outcome.round_seconds is not None and rss is not None:
        say(
            f"foedus round: {outcome.collaborators} x {args.round_model_mb:g} MB in "
            f"{outcome.round_seconds:.2f} s; aggregator peak RSS {rss:.0f} MB"
        )
    else:
        say(f"foedus round: did not close; {len(outcome.errors)} errors")
    say(
        f"raw gRPC/TLS round with the downloads kept in memory and the uploads fsynced: "
        f"{raw_durable:.2f} s"
    )


def measure_steady_round_phase(run: Run, names: Sequence[str]) -> None:
    """The same round as the second of a federation: processes, memory and connections warm.

    Not a target: the first round is (`round_seconds`). Set beside it, it shows what a first
    round pays once (first touch of memory, connection windows) that later rounds do not.
    """
    args = run.args
    outcome = measure_round(
        run,
        "steady",
        names[: args.round_collaborators],
        model_mb=args.round_model_mb,
        tensors=args.round_tensors,
        rounds=2,
    )
    sampled = [
        mb
        for mb in (outcome.rss_until_last_upload_mb, outcome.rss_after_last_upload_mb)
        if mb is not None
    ]
    run.results.update(
        steady_round_seconds=outcome.round_seconds,
        steady_round_download_seconds_max=outcome.download_seconds_max,
        steady_round_upload_seconds_max=outcome.upload_seconds_max,
        steady_round_close_after_last_upload_seconds=outcome.close_after_last_upload_seconds,
        steady_round_aggregator_rss_mb=max(sampled, default=None),
        steady_round_errors=len(outcome.errors),
    )
    if outcome.errors:
        run.results["steady_round_first_error"] = outcome.errors[0]
    if outcome.round_seconds is not None:
        say(
            f"foedus round, the second of a federation: {outcome.round_seconds:.2f} s; "
            f"aggregator RSS in it up to {max(sampled, default=0):.0f} MB"
        )
    else:
        say(f"foedus second round: did not close; {len(outcome.errors)} errors")


def measure_scale_phase(run: Run, names: Sequence[str]) -> None:
    """One round with many collaborators and a small model, on one aggregator."""
    args = run.args
    outcome = measure_round(
        run,
        "scale",
        names[: args.scale_collaborators],
        model_mb=args.scale_model_kb / KIB,
        tensors=2,
        hold=False,  # the real loop's polling after an upload is part of the load
    )
    run.results.update(
        scale_collaborators=outcome.collaborators,
        scale_round_seconds=outcome.wall_seconds,
        scale_ms_per_collaborator=(
            None
            if outcome.wall_seconds is None
            else 1000 * outcome.wall_seconds / outcome.collaborators
        ),
        scale_aggregator_cpu_ms_per_collaborator=(
            None
            if outcome.aggregator_cpu_seconds is None
            else 1000 * sum(outcome.aggregator_cpu_seconds) / outcome.collaborators
        ),
        scale_connect_seconds=outcome.connect_seconds,
        scale_errors=len(outcome.errors),
        scale_client_warnings=outcome.warnings,
        scale_get_tasks_calls=outcome.get_tasks_calls,
        scale_aggregator_peak_rss_mb=outcome.peak_rss_mb,
        scale_aggregator_reported_seconds=outcome.aggregator_seconds,
        **cpu_figures("scale_aggregator", outcome.aggregator_cpu_seconds),
        **cpu_figures("scale_client", outcome.client_cpu_seconds),
        scale_download_seconds_max=outcome.download_seconds_max,
        scale_upload_seconds_max=outcome.upload_seconds_max,
        scale_aggregator_exit=outcome.aggregator_exit,
    )
    if outcome.errors:
        run.results["scale_first_error"] = outcome.errors[0]
        run.results["scale_error_kinds"] = error_kinds(outcome.errors)
    if outcome.first_warning:
        run.results["scale_first_warning"] = outcome.first_warning
    closed = "did not close" if outcome.wall_seconds is None else f"{outcome.wall_seconds:.2f} s"
    say(
        f"foedus scale: {outcome.collaborators} collaborator threads: {closed}, "
        f"{len(outcome.errors)} errors, {outcome.warnings} client warnings (retries)"
    )


def error_kinds(errors: Sequence[str]) -> dict[str, int]:
    """How many errors of each kind: their text without the collaborator's name before it."""
    return dict(Counter(re.sub(r"^col\d+: ", "", error) for error in errors).most_common())


# -- phase 9: wide area --------------------------------------------------------------------------


def measure_wan(run: Run, names: Sequence[str]) -> None:
    """The wide-area round of random bytes, then a real model's, once per code."""
    wan.measure_phase(run, names)
    wan_codes.measure_phase(run, names)


# -- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A target of the issue, for the table."""

    key: str
    text: str
    met: Callable[[Mapping[str, Any]], bool]


TARGETS = (
    Target("upload_ratio", ">= 0.7", lambda r: r["upload_ratio"] >= 0.7),
    Target("download_ratio", ">= 0.7", lambda r: r["download_ratio"] >= 0.7),
    Target(
        "round_seconds",
        "<= 1.5 x raw_round_seconds",
        lambda r: r["round_seconds"] <= 1.5 * r["raw_round_seconds"],
    ),
    Target(
        "round_over_raw_durable_round",
        "<= 1.3",
        lambda r: r["round_over_raw_durable_round"] <= 1.3,
    ),
    Target("rss_over_model", "<= 2.5", lambda r: r["rss_over_model"] <= 2.5),
    Target("wan_ratio", "<= 1.25", lambda r: r["wan_ratio"] <= 1.25),
    Target("wan_steady_ratio", "<= 1.10", lambda r: r["wan_steady_ratio"] <= 1.10),
    Target("wan_lossless_ratio", "<= 0.90", lambda r: r["wan_lossless_ratio"] <= 0.90),
    Target("wan_int8_ratio", "<= 0.35", lambda r: r["wan_int8_ratio"] <= 0.35),
    Target("wan_topk_ratio", "<= 0.10", lambda r: r["wan_topk_ratio"] <= 0.10),
    Target(
        "secure_round_over_plain",
        "<= 1.5 (Flower's SecAgg+: 6.0)",
        lambda r: r["secure_round_over_plain"] <= 1.5,
    ),
    Target("secure_rss_over_model", "<= 2.5", lambda r: r["secure_rss_over_model"] <= 2.5),
    Target(
        "secure_upload_over_plain",
        "<= 1 (+ the masked weight's one value)",
        lambda r: (
            r["secure_bits"] <= 32
            and r["secure_upload_bytes"] <= r["secure_plain_upload_bytes"] + r["secure_bits"] // 8
        ),
    ),
    Target(
        "secure_setup_seconds",
        "< 5 (with 100 sites)",
        lambda r: r["secure_setup_seconds"] < 5 and r["secure_setup_collaborators"] >= 100,
    ),
    Target(
        "secure_scale_errors",
        "0 (with 500 sites)",
        lambda r: (
            r["secure_scale_errors"] == 0
            and r["secure_scale_collaborators"] >= 500
            and r["secure_scale_round_seconds"] is not None
        ),
    ),
    Target(
        "dp_round_over_plain",
        "<= 1.05",
        lambda r: r["dp_round_over_plain"] <= 1.05,
    ),
    Target(
        "scale_errors",
        "0 (with 2000 collaborators)",
        lambda r: (
            r["scale_errors"] == 0
            and r["scale_collaborators"] >= 2000
            and r["scale_round_seconds"] is not None
        ),
    ),
)


TABLE_KEYS = (
    "raw_grpc_tls_mb_s",
    "raw_durable_upload_mb_s",
    "raw_kept_download_mb_s",
    "disk_write_mb_s",
    "round_disk_floor_seconds",
    "raw_grpc_tls_download_mb_s",
    "raw_grpc_tls_unary_download_mb_s",
    "upload_mb_s",
    "download_mb_s",
    "upload_ratio",
    "download_ratio",
    "download_ratio_vs_raw_kept",
    "download_ratio_vs_raw_unary",
    "upload_ratio_vs_raw_durable",
    "raw_round_seconds",
    "raw_durable_round_seconds",
    "round_seconds",
    "round_over_raw_durable_round",
    "round_download_seconds_max",
    "round_upload_seconds_max",
    "round_close_after_last_upload_seconds",
    "round_aggregator_cpu_seconds",
    "round_aggregator_sys_seconds",
    "round_client_cpu_seconds",
    "round_client_sys_seconds",
    "raw_durable_round_server_cpu_seconds",
    "raw_durable_round_client_cpu_seconds",
    "aggregator_peak_rss_mb",
    "round_aggregator_rss_until_last_download_mb",
    "round_aggregator_rss_until_last_upload_mb",
    "round_aggregator_rss_after_last_upload_mb",
    "rss_over_model",
    "steady_round_seconds",
    "steady_round_download_seconds_max",
    "steady_round_upload_seconds_max",
    "steady_round_close_after_last_upload_seconds",
    "steady_round_aggregator_rss_mb",
    "scale_collaborators",
    "scale_connect_seconds",
    "scale_round_seconds",
    "scale_ms_per_collaborator",
    "scale_aggregator_cpu_ms_per_collaborator",
    "scale_client_cpu_seconds",
    "scale_errors",
    "scale_client_warnings",
    "scale_get_tasks_calls",
    "scale_aggregator_cpu_seconds",
    "scale_aggregator_peak_rss_mb",
    "secure_plain_round_seconds",
    "secure_round_seconds",
    "secure_round_over_plain",
    "secure_round_setup_seconds",
    "secure_round_mask_seconds_max",
    "secure_round_mask_cpu_seconds_max",
    "secure_round_unmask_seconds_max",
    "secure_plain_round_close_after_last_upload_seconds",
    "secure_round_close_after_last_upload_seconds",
    "secure_plain_round_aggregator_cpu_seconds",
    "secure_round_aggregator_cpu_seconds",
    "secure_plain_round_client_cpu_seconds",
    "secure_round_client_cpu_seconds",
    "secure_plain_aggregator_peak_rss_mb",
    "secure_aggregator_peak_rss_mb",
    "secure_round_aggregator_rss_until_last_upload_mb",
    "secure_round_aggregator_rss_after_last_upload_mb",
    "secure_rss_over_model",
    "secure_plain_upload_bytes",
    "secure_upload_bytes",
    "secure_upload_over_plain",
    "secure_model_max_abs_diff",
    "secure_round_errors",
    "secure_setup_collaborators",
    "secure_setup_seconds",
    "secure_setup_site_seconds_max",
    "secure_setup_site_cpu_seconds_max",
    "secure_setup_round_seconds",
    "secure_setup_aggregator_cpu_seconds",
    "secure_setup_client_cpu_seconds",
    "secure_setup_errors",
    "secure_scale_collaborators",
    "secure_scale_neighbours",
    "secure_scale_setup_seconds",
    "secure_scale_round_seconds",
    "secure_scale_aggregator_cpu_seconds",
    "secure_scale_aggregator_peak_rss_mb",
    "secure_scale_errors",
    "dp_plain_round_seconds",
    "dp_round_seconds",
    "dp_round_over_plain",
    "dp_plain_round_close_after_last_upload_seconds",
    "dp_round_close_after_last_upload_seconds",
    "dp_close_over_plain",
    "dp_plain_round_aggregator_cpu_seconds",
    "dp_round_aggregator_cpu_seconds",
    "dp_round_errors",
    *(
        f"transcode_{code}_{figure}"
        for code in wan_codes.CONFIGURATIONS
        for figure in ("seconds", "receive_seconds")
    ),
    "wan_floor_seconds",
    "wan_round_seconds",
    "wan_ratio",
    "wan_steady_round_seconds",
    "wan_steady_ratio",
    "wan_wire_over_payload",
    "wan_real_model_mb",
    "wan_real_floor_seconds",
    *(
        f"wan_{code}_{figure}"
        for code in wan_codes.CONFIGURATIONS
        for figure in (
            "round_seconds",
            "ratio",
            "link_ratio",
            "first_round_seconds",
            "download_seconds_max",
            "upload_seconds_max",
            "site_seconds_max",
            "close_seconds",
            "before_download_seconds",
            "wire_over_payload",
        )
    ),
    "cert_setup_seconds",
)


def judge(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target: its text and whether this run met it (False when not measured)."""
    verdicts = {}
    for target in TARGETS:
        try:
            met = bool(target.met(results))
        except (KeyError, TypeError):
            met = False
        verdicts[target.key] = {"target": target.text, "met": met}
    return verdicts


def table(results: Mapping[str, Any], verdicts: Mapping[str, Mapping[str, Any]]) -> str:
    """The figures as a text table: key, value, target, met?"""
    rows = [("key", "value", "target", "met?")]
    for key in TABLE_KEYS:
        if key not in results:
            continue
        value = results[key]
        shown = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        verdict = verdicts.get(key)
        rows.append(
            (
                key,
                shown,
                "" if verdict is None else verdict["target"],
                "" if verdict is None else ("yes" if verdict["met"] else "NO"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """What ran this benchmark."""
    return {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
    }


def benchmark(run: Run) -> None:
    """Every phase, in order, into `run.results`."""
    args = run.args
    secure_sites = (
        args.round_collaborators,
        args.secure_setup_collaborators,
        args.secure_scale_collaborators,
    )
    count = max(args.repeats + 2, args.scale_collaborators, *secure_sites, 2)
    if args.only == "scale":
        count = max(args.scale_collaborators, 2)
    elif args.only == "secure":
        count = max(*secure_sites, 2)
    elif args.only == "dp":
        count = max(args.round_collaborators, 2)
    elif args.only == "wan":
        count = wan.SITES
    elif args.only == "transcode":
        count = 2  # no collaborator connects: certificates are made as for any part
    names = collaborator_names(count)
    # Each collaborator thread holds a connection of its own, as the aggregator holds one each.
    raise_open_file_limit(files_needed(count))
    say(f"making a CA and certificates for 1 aggregator and {count} collaborators")
    started = time.perf_counter()
    setup_local_federation(
        run.certs,
        aggregator_host="localhost",
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1", *wan.aggregator_addresses()),
        collaborators=names,
    )
    run.results["cert_setup_seconds"] = time.perf_counter() - started
    run.results["cert_count"] = count + 1
    say(f"certificates made in {run.results['cert_setup_seconds']:.1f} s (not in any timing)")
    parts: dict[str, Callable[[], None]] = {
        "raw": partial(measure_raw, run, names),
        "disk": partial(measure_disk, run),
        "transfer": partial(measure_transfer, run, names),
        "probe": partial(probe_single_tensor, run, names),
        "round": partial(measure_round_phase, run, names),
        "steady": partial(measure_steady_round_phase, run, names),
        "scale": partial(measure_scale_phase, run, names),
        "secure": partial(secure_cost.measure_phase, run, names),
        "dp": partial(dp_cost.measure_phase, run, names),
        "transcode": partial(transcode_cost.measure_phase, run),
        "wan": partial(measure_wan, run, names),
    }
    for part in PARTS:
        if args.only in (None, part) and (part != "probe" or args.probe or args.only == part):
            parts[part]()
    if args.profile:
        profile = run.results.setdefault("profile", {})
        say("one download and one upload again, the aggregator under cProfile")
        profile["aggregator_transfer"] = profile_transfer(run, names)
        say("the round again, its aggregator under cProfile")
        profile["aggregator_round"] = profile_round(run, names)
        if args.only in (None, "secure"):
            say("the secure round again, its aggregator under cProfile")
            profile["aggregator_secure_round"] = secure_cost.profile_secure_round(run, names)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets met or not), 1 when something crashed."""
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="foedus-bench-"))
    run = Run(args=args, work=work, certs=CertsLayout(work / "certs"))
    started = datetime.datetime.now(datetime.UTC)
    run.results.update(
        payload_mb=args.payload_mb,
        tensor_mb=args.tensor_mb,
        repeats=args.repeats,
        round_collaborators=args.round_collaborators,
        round_model_mb=args.round_model_mb,
        round_tensors=args.round_tensors,
        scale_model_kb=args.scale_model_kb,
        wan_model_mb=args.wan_model_mb,
        wan_rounds=args.wan_rounds,
        wan_rate_mbit=args.wan_rate_mbit,
        wan_rtt_ms=args.wan_rtt_ms,
        wan_codes=list(args.wan_codes),
        wan_train_images=args.wan_train_images,
        quick=args.quick,
        only=args.only,
        mb_unit="MiB (2**20 bytes)",
        started_utc=started.isoformat(timespec="seconds"),
        **versions(),
    )
    status = 0
    try:
        benchmark(run)
    except Exception:
        status = 1
        run.results["crash"] = traceback.format_exc()
        print(traceback.format_exc(), file=sys.stderr)
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    finished = datetime.datetime.now(datetime.UTC)
    run.results["finished_utc"] = finished.isoformat(timespec="seconds")
    run.results["total_seconds"] = (finished - started).total_seconds()
    unmeasured = [key for key in REQUIRED_KEYS if not _is_number(run.results.get(key))]
    if unmeasured and args.only is None:
        run.note(f"not measured in this run: {', '.join(unmeasured)}")
    verdicts = judge(run.results)
    run.results["targets"] = verdicts
    run.results["notes"] = run.notes
    write_json(args.output, run.results)
    print(table(run.results, verdicts))
    profile = run.results.get("profile")
    if isinstance(profile, dict):
        print_profile(profile)
    for text in run.notes:
        print(f"note: {text}")
    print(f"written: {args.output}")
    return status


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    """The results as strict JSON (no NaN), written whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    temporary.replace(path)


if __name__ == "__main__":
    sys.exit(main())
