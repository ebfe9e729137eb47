"""The wide-area round with a real model's update, once per compression code (`wan_<code>_*`).

Random bytes do not compress, so these runs federate a real model: a wide MLP on the digits
images (`wan_model.py`, about `wan_model_mb` MiB of float32), each of the 4 sites training it
one local epoch a round by SGD with momentum (`wan_torch.py`, PyTorch, so the aggregator and the
sites run under `.venv-torch`'s interpreter: `make torch-env`) on the first `wan_train_images`
images of its shard: 64 by default, 2 steps, still a real SGD update, and a round that measures
the transport rather than 4 sites training at once on this machine's 2 cores (0: the whole
shard, ~360 images, 12 steps, the runs before 2026-12-07). The links are
the wide-area round's (`wan.py`). Each code in `--wan-codes` is a federation of its own, its
plan's `compression` section as `CONFIGURATIONS` says, `wan_rounds` rounds.

`wan_<code>_ratio` = the mean of its rounds after the first (connected, windows open) over the
UNCOMPRESSED floor, `wan_real_floor_seconds` (the model down and up one link at the shaped rate,
the same for every code): what a code buys against sending the model raw. The round includes
each site's local epoch and its encoding (`wan_<code>_site_seconds_max`, the slowest site's
time from its download's end to its upload's start), as a federation's round does.
`wan_<code>_link_ratio`: the same rounds less the local work of the site the round waited for
(its upload ended last), over the same floor: the round as if training were instant. On this
machine the 4 sites train on the same 2 cores, where a federation's sites each have their own,
so the local work weighs more here than in a federation; the targets are judged on
`wan_<code>_ratio` all the same, the round as the issue defines it.
`wan_<code>_wire_over_payload`: bytes on the links over the uncompressed bytes the rounds moved.
Where a steady round goes: `wan_<code>_before_download_seconds` (the previous round's line to
the first download's start), `_download_seconds_max`, `_site_seconds_max`, `_upload_seconds_max`
(its first byte to the aggregator's answer), `_close_seconds` (the last answer to the round's line).

A code whose plan the plan loader refuses (every code but `none` until the wire carries them,
issue #24) is skipped with a note: nothing to change here when it carries them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any, Final

from foedus.plans import PlanError, load_plan
from foedus.plans.schema import RunnerSettings

# isort: split
# The benchmark's own modules, beside this file.
import wan
from harness import HERE, REPO, BenchmarkError, Run, limits_for, say, write_plan
from wan_model import FLOAT32_BYTES, MIB, parameter_bytes, width_for

RUNNER: Final = "wan_torch:WideDigitsRunner"  # found through the PYTHONPATH of `torch_env`
BATCH_SIZE: Final = 32  # the digits example's: a site's ~360 training images, 12 steps an epoch
TRAIN_IMAGES: Final = 64  # of each site's shard a round: 2 steps, the epoch short beside the link
LEARNING_RATE: Final = 0.05  # SGD with momentum 0.9, the digits CNN runner's
TORCH_CHECK_SECONDS: Final = 120.0  # importing PyTorch on a loaded machine

# Each configuration's `compression` section; the targets for three of them.
CONFIGURATIONS: Final[Mapping[str, Mapping[str, object]]] = {
    "none": {},
    "lossless": {"upload": "lossless", "download": "lossless"},
    "bfloat16": {"upload": "bfloat16", "download": "bfloat16"},
    "int8": {"upload": "int8", "download": "int8"},
    "topk": {
        "upload": {"code": "topk", "fraction": 0.01, "values": "int8"},
        "download": "lossless",
    },
}
DEFAULT_CODES: Final = ("none", "lossless", "int8", "topk")


def codes_option(text: str) -> tuple[str, ...]:
    """`--wan-codes`: names of `CONFIGURATIONS`, comma-separated ("" for none of them)."""
    codes = tuple(code.strip() for code in text.split(",") if code.strip())
    unknown = [code for code in codes if code not in CONFIGURATIONS]
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)} (known: {', '.join(CONFIGURATIONS)})")
    return codes


def torch_env() -> dict[str, str]:
    """The environment of the processes under `.venv-torch`: this checkout's foedus (REPO) and
    the benchmark's modules (HERE) found first, whatever checkout that interpreter was made in."""
    path = [str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(part for part in path if part), "PYTHONUNBUFFERED": "1"}


def torch_unavailable(python: str) -> str | None:
    """Why `python` cannot run the real model's runner (no such file, no PyTorch); None if it can."""
    if not os.access(python, os.X_OK):
        return f"{python} not found: make torch-env makes it"
    try:
        result = subprocess.run(
            [python, "-c", "import wan_torch"],
            capture_output=True,
            text=True,
            timeout=TORCH_CHECK_SECONDS,
            env={**os.environ, **torch_env()},
            cwd=REPO,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{python} took over {TORCH_CHECK_SECONDS:g} s to import wan_torch"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"{python} cannot import wan_torch ({last}): make torch-env brings it up to date"
    return None


@dataclass(frozen=True)
class RealModel:
    """The real model of these runs: its width, its bytes, its largest tensor's bytes."""

    width: int
    model_bytes: int
    largest_tensor_bytes: int

    @classmethod
    def of(cls, model_mb: float) -> RealModel:
        """The model closest to `model_mb` MiB."""
        width = width_for(model_mb)
        return cls(width, parameter_bytes(width), FLOAT32_BYTES * width * width)

    def runner(self, train_images: int = TRAIN_IMAGES) -> RunnerSettings:
        """The plan's `runner` section: the digits split IID, one epoch a round on the first
        `train_images` images of each site's shard (0: all of it)."""
        settings = {
            "width": self.width,
            "epochs": 1,
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "train_images": train_images,
        }
        return RunnerSettings(RUNNER, 0, settings)


def _last_lines(text: str, count: int = 3) -> str:
    """The first line of an error and its last `count` (a site's stderr tail ends in the cause)."""
    lines = [line for line in text.splitlines() if line.strip()]
    shown = lines[:1] + lines[max(1, len(lines) - count) :]
    return " | ".join(shown)


def figures(code: str, outcome: wan.WanOutcome, floor: float) -> dict[str, Any]:
    """One code's run as `bench.json`'s `wan_<code>_*` keys; the steady rounds' means."""
    first, *later = outcome.round_seconds
    steady = mean(later) if later else first  # one round: the first is all there is

    def steady_mean(values: Sequence[float | None]) -> float | None:
        known = [value for value in values[1:] if value is not None]
        return mean(known) if known else None

    links = [
        None if site is None else seconds - site
        for seconds, site in zip(outcome.round_seconds, outcome.last_site_seconds, strict=False)
    ]
    link = steady_mean(links)
    return {
        f"wan_{code}_round_seconds": steady,
        f"wan_{code}_ratio": steady / floor,
        f"wan_{code}_link_ratio": None if link is None else link / floor,
        f"wan_{code}_first_round_seconds": first,
        f"wan_{code}_rounds_seconds": outcome.round_seconds,
        f"wan_{code}_download_seconds_max": steady_mean(outcome.download_seconds_max),
        f"wan_{code}_upload_seconds_max": steady_mean(outcome.upload_seconds_max),
        f"wan_{code}_site_seconds_max": steady_mean(outcome.site_seconds_max),
        f"wan_{code}_close_seconds": steady_mean(outcome.close_seconds),
        f"wan_{code}_before_download_seconds": steady_mean(outcome.before_download_seconds),
        f"wan_{code}_wire_over_payload": outcome.wire_over_payload,
    }


def measure_phase(run: Run, names: Sequence[str]) -> None:
    """Each code of `--wan-codes` as a wide-area federation of the real model, into
    `run.results`; a note for each that could not run and why."""
    args = run.args
    if not args.wan or not args.wan_codes:
        return
    reason = wan.unavailable() or torch_unavailable(args.wan_torch_python)
    if reason is not None:
        run.note(f"wide-area rounds of a real model skipped: {reason}")
        return
    model = RealModel.of(args.wan_model_mb)
    floor = 2 * model.model_bytes / (args.wan_rate_mbit * 1e6 / 8)
    run.results.update(
        wan_real_model_mb=model.model_bytes / MIB,
        wan_real_width=model.width,
        wan_real_floor_seconds=floor,
    )
    sites = list(names[: wan.SITES])
    for code in args.wan_codes:
        plan_path = write_plan(
            run,
            f"wan-{code}",
            sites,
            model_mb=args.wan_model_mb,
            tensors=1,
            limits=limits_for(model.largest_tensor_bytes, model.model_bytes),
            rounds=args.wan_rounds,
            compression=CONFIGURATIONS[code] or None,
            runner=model.runner(args.wan_train_images),
        )
        try:
            load_plan(plan_path)
        except PlanError as error:
            run.note(f"wide-area round with {code} skipped: {error.problems[0]}")
            continue
        try:
            outcome = wan.measure_federation(
                run,
                sites,
                wan.Federation(plan_path, model.model_bytes, args.wan_torch_python, torch_env()),
            )
        except wan.LinksUnavailableError as error:
            run.note(f"wide-area round with {code} skipped: {str(error).splitlines()[0]}")
            return
        except BenchmarkError as error:  # the next code may run: its note says what failed
            run.note(f"wide-area round with {code} failed: {_last_lines(str(error))}")
            continue
        run.results.update(figures(code, outcome, floor))
        say(
            f"wide-area round with {code}: {len(sites)} sites training a "
            f"{model.model_bytes / MIB:.1f} MB MLP on {args.wan_train_images or 'all'} images "
            f"each: rounds "
            f"{', '.join(f'{s:.2f}' for s in outcome.round_seconds)} s, uncompressed floor "
            f"{floor:.2f} s, {outcome.wire_over_payload:.3f} of its bytes on the links"
        )
