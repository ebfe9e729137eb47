"""`bench.py`'s transcode part: what a coded upload costs the aggregator to make raw, per code.

Not a target: it tells the next slice what decoding an upload while it arrives would save. An
aggregator answers a coded upload only once `foedus.aggregator.transcode` has written the raw
upload it stands for (the spool read back, each delta decoded and added to the round's global
model, a new file written), so in the wide-area round that time is on every site's upload.

One upload of the wide-area round's real model's shapes (`wan_model.layer_sizes` for
`wan_model_mb`): float32 weights drawn as PyTorch draws a linear layer's, a site's update
`DELTA` of their size drawn around them (synthetic: this process has no PyTorch), coded as a
site codes it (`foedus.collaborator.compressed.encode_upload`, each code of
`wan_codes.CONFIGURATIONS`' uploads) and framed as its client frames it (`task_results_parts`),
then received in this process by `receive_upload` in chunks of the client's size, as the
servicer hands them in, without a socket. Each code `TRANSCODE_REPEATS` times, the fastest kept:

* `transcode_<code>_seconds`: the `transcode` call alone (timed around the real function);
* `transcode_<code>_receive_seconds`: all of `receive_upload` (parse, hash, spool, transcode);
  `none`'s is the raw upload's, the reference;
* `transcode_<code>_fsync_seconds`: the fsync of the received (raw) file, which the store makes
  before the aggregator answers. Here the upload arrives at memory speed, so every code's file
  is written whole before it; over a wide-area link a raw upload's writeback runs while it
  arrives (`receive_upload` starts it every few MB), a coded one's only after its payload is in;
* `transcode_<code>_base_seconds`: under a lossy download code, what the sites decoded of the
  global model, which the aggregator computes once a round for the first coded upload;
* `transcode_<code>_encode_seconds`: the site's `encode_upload` (on the round's path too; its
  residuals' durable save not counted);
* `transcode_<code>_payload_ratio`: the upload's bytes over the raw upload's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from foedus.aggregator import upload as upload_module
from foedus.collaborator.client import OutgoingTensor, task_results_parts
from foedus.collaborator.compressed import encode_upload
from foedus.compression.codes import Code
from foedus.compression.download import round_trip
from foedus.plans.compression import compression
from foedus.plans.reader import Section
from foedus.plans.schema import CodeSettings, CompressionSettings
from foedus.protos import aggregator_pb2
from foedus.protos.stream import CHUNK_BYTES, joined

# isort: split
# The benchmark's own modules, beside this file.
from harness import MIB, BenchmarkError, Run, say, timed
from wan_codes import CONFIGURATIONS
from wan_model import layer_sizes, width_for

Array = npt.NDArray[np.generic]
DELTA: Final = 0.01  # an update's values move by this share of the weights' scale
TRANSCODE_REPEATS: Final = 3
HEADER: Final = aggregator_pb2.MessageHeader(sender="col000", receiver="aggregator")


def codes_of(code: str) -> CompressionSettings:
    """The `compression` section of `wan_codes.CONFIGURATIONS[code]`, read by the plan's reader."""
    problems: list[str] = []
    settings = compression(Section(CONFIGURATIONS[code], "compression", problems))
    if problems:
        raise BenchmarkError(f"wan_codes.CONFIGURATIONS[{code!r}]: {'; '.join(problems)}")
    return settings


def model_and_update(model_mb: float, seed: int = 24) -> tuple[dict[str, Array], dict[str, Array]]:
    """The real model's shapes: weights uniform in +-1/sqrt(inputs) (PyTorch's `nn.Linear`),
    and a site's step from them, each value a normal draw of `DELTA` of that bound."""
    rng = np.random.default_rng(seed)
    model: dict[str, Array] = {}
    step: dict[str, Array] = {}
    for layer, (inputs, outputs) in enumerate(layer_sizes(width_for(model_mb))):
        bound = 1 / math.sqrt(inputs)
        for name, shape in ((f"{layer}.weight", (outputs, inputs)), (f"{layer}.bias", (outputs,))):
            model[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
            step[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(DELTA * bound)
    return model, step


def site_base(download: Code, model: Mapping[str, Array]) -> dict[str, Array]:
    """What a site decodes of `model` sent in `download`: the base of its delta, which the
    aggregator computes once a round for the uploads (`EncodedModel.base`)."""
    return {name: round_trip(download, array, name=name) for name, array in model.items()}


def framed(
    base: Mapping[str, Array], trained: Mapping[str, Array], settings: CodeSettings
) -> tuple[bytes, float]:
    """The upload's bytes as the site's client sends them, and the seconds its coding took."""
    started = time.perf_counter()
    coded = (
        dict.fromkeys(trained)
        if settings.code is Code.NONE
        else encode_upload(settings, base, trained, {}).coded
    )
    encode_seconds = time.perf_counter() - started
    head = aggregator_pb2.TaskResults(
        header=HEADER, round_number=1, task_name="train", data_size=64
    )
    tensors = [
        OutgoingTensor(name, array, ("trained",), coded=coded[name])
        for name, array in trained.items()
    ]
    return joined(task_results_parts(head, tensors)), encode_seconds


@contextmanager
def timing_transcode(seconds: list[float]) -> Iterator[None]:
    """The real `transcode`, each call's seconds appended to `seconds`, while inside."""
    real = getattr(upload_module, "transcode")  # noqa: B009 - imported there, not exported

    def timed_call(*args: Any, **kwargs: Any) -> object:
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(upload_module, "transcode", timed_call)  # noqa: B010 - the real one, timed on purpose
    try:
        yield
    finally:
        setattr(upload_module, "transcode", real)  # noqa: B010


@dataclass(frozen=True)
class Received:
    """Seconds one upload took: `receive_upload`, then the fsync of its file (as on accepting)."""

    receive: float
    fsync: float


def receive(data: bytes, folder: Path, base: Mapping[str, Array], code: CodeSettings) -> Received:
    """One `receive_upload` over `data` in the client's chunks, its file fsynced as the store
    fsyncs it before the aggregator answers; its files removed."""
    view = memoryview(data)
    chunks = (view[start : start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES))
    started = time.perf_counter()
    received = upload_module.receive_upload(
        chunks,
        folder,
        on_head=lambda head: None,
        model_dtype=lambda name: base[name].dtype if name in base else None,
        max_tensor_bytes=max(array.nbytes for array in base.values()),
        expected_bytes=len(data),
        base=base.get,
        upload_code=code,
    )
    seconds = time.perf_counter() - started
    with received.file.path.open("rb") as file:
        synced = timed(lambda: os.fsync(file.fileno()))
    del received  # its tensors are mapped from the file
    for path in folder.iterdir():
        path.unlink()
    return Received(seconds, synced)


def measure(
    codes: Sequence[str], model_mb: float, folder: Path, repeats: int = TRANSCODE_REPEATS
) -> dict[str, Any]:
    """Each of `codes` (`none` first, the reference) as `transcode_<code>_*` figures."""
    model, step = model_and_update(model_mb)
    raw_bytes: int | None = None
    figures: dict[str, Any] = {"transcode_model_mb": sum(a.nbytes for a in model.values()) / MIB}
    folder.mkdir(parents=True, exist_ok=True)
    for code in ("none", *(code for code in codes if code != "none")):
        settings = codes_of(code)
        started = time.perf_counter()
        base = site_base(settings.download.code, model)
        base_seconds = time.perf_counter() - started
        trained = {name: np.add(base[name], step[name], dtype=np.float32) for name in model}
        data, encode_seconds = framed(base, trained, settings.upload)
        raw_bytes = raw_bytes or len(data)
        transcoded: list[float] = []
        with timing_transcode(transcoded):
            received = [receive(data, folder, base, settings.upload) for _ in range(repeats)]
        figures.update(
            {
                f"transcode_{code}_seconds": min(transcoded) if transcoded else None,
                f"transcode_{code}_receive_seconds": min(one.receive for one in received),
                f"transcode_{code}_fsync_seconds": min(one.fsync for one in received),
                f"transcode_{code}_base_seconds": (
                    base_seconds if settings.download.code.lossy else None
                ),
                f"transcode_{code}_encode_seconds": encode_seconds,
                f"transcode_{code}_payload_ratio": len(data) / raw_bytes,
            }
        )
    return figures


def measure_phase(run: Run, codes: Sequence[str] = tuple(CONFIGURATIONS)) -> None:
    """One upload of the wide-area model per code, received and made raw, into `run.results`."""
    model_mb = run.args.wan_model_mb
    figures = measure(codes, model_mb, run.work / "transcode")
    run.results.update(figures)
    shown = "; ".join(
        f"{code} {figures[f'transcode_{code}_receive_seconds']:.2f} s"
        + (
            ""
            if figures[f"transcode_{code}_seconds"] is None
            else f" ({figures[f'transcode_{code}_seconds']:.2f} s of it transcoding)"
        )
        + f", fsync {figures[f'transcode_{code}_fsync_seconds']:.2f} s"
        for code in codes
    )
    say(f"one {figures['transcode_model_mb']:.1f} MB upload received, per code: {shown}")
