"""`bench.py`'s secure part: what secure aggregation costs, beside plain rounds of the same run.

Three measurements, each a real aggregator (`aggregator start`) and collaborator threads running
the real loop and the real secure rounds (`rounds.py`), the no-op runner adding `TRAIN_DELTA` to
every value, each site weighing 1 (`max_weight` 1: the finest fixed point the ring allows):

1. plain, then secure: `round_collaborators` x `round_model_mb` (the round part's sizes), one
   round each, in this order, `secure_pairs` times: `secure_round_over_plain` (the fastest of
   each: first download to the aggregator's round line, the secure stages inside it), the
   aggregator's largest peak memory in a secure round over the model (`secure_rss_over_model`),
   the largest masked upload's bytes over the plain one's (`secure_upload_over_plain`), and the
   first pair's final models compared (`secure_model_max_abs_diff`: the quantization, measured).
2. setup: a secure round of `secure_setup_collaborators` sites (100) and a `scale_model_kb` model:
   `secure_setup_seconds`, from the first site's KEYS post to the last site's SHARES relay
   accepted (every key signed, relayed and checked, every share sealed, relayed and opened:
   real RPCs against the real aggregator). The sites are threads of this one process on the
   machine's cores, so this is the slowest case: each site's own CPU for it (its thread's,
   `secure_setup_site_cpu_seconds_max`) is what a site on a machine of its own would spend.
3. neighbours: a secure round of `secure_scale_collaborators` sites (500) with `neighbours`
   set (SecAgg+): its errors (a collaborator's, a round that did not close, closed untrained or
   with a site missing), `secure_scale_errors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foedus.aggregator.storage import read_model

# isort: split
# The benchmark's own modules, beside this file.
from harness import KIB, Run, say
from profiled_aggregator import PROFILED_RPCS
from profiling import top_functions
from rounds import RoundOutcome, measure_round

# Each site's update: every value moved by 2**-10 (the no-op runner's `train_delta`).
TRAIN_DELTA = 2.0**-10
CLIP = 1.0  # above the delta: nothing is cut
# The no-op runner's settings of every round here, plain or secure: each site weighs 1.
RUNNER = {"train_delta": TRAIN_DELTA, "data_size": 1}


def settings(bits: int, neighbours: int | None = None) -> dict[str, object]:
    """The plan's `secure_aggregation` section of every secure round here."""
    section: dict[str, object] = {"enabled": True, "bits": bits, "clip": CLIP, "max_weight": 1}
    if neighbours is not None:
        section["neighbours"] = neighbours
    return section


def measure_phase(run: Run, names: Sequence[str]) -> None:
    """The three measurements, in order (see the module's docstring)."""
    measure_secure_round(run, names)
    measure_setup(run, names)
    measure_neighbours(run, names)


def round_errors(outcome: RoundOutcome) -> list[str]:
    """A round's errors, and its line's when it closed untrained or without a site."""
    errors = list(outcome.errors)
    line = outcome.round_line or ""
    if "untrained" in line:
        errors.append(f"the round closed untrained: {line}")
    if "(missing " in line:
        errors.append(f"the round closed without some sites: {line[:300]}")
    return errors


def span(marks: Sequence[Mapping[str, float]], start: str, end: str) -> float | None:
    """From the first `start` mark to the last `end` mark of every collaborator."""
    starts = [m[start] for m in marks if start in m]
    ends = [m[end] for m in marks if end in m]
    if not starts or not ends or len(ends) < len(marks):
        return None
    return max(ends) - min(starts)


def longest(marks: Sequence[Mapping[str, float]], start: str, end: str) -> float | None:
    """The longest `end - start` of one collaborator."""
    return max((m[end] - m[start] for m in marks if start in m and end in m), default=None)


def largest(marks: Sequence[Mapping[str, float]], key: str) -> float | None:
    """The largest value of `key` among the collaborators' marks."""
    return max((m[key] for m in marks if key in m), default=None)


def final_model(run: Run, phase: str) -> Path:
    """Where the aggregator of `phase` saved its last model (`write_plan`'s output_dir)."""
    return run.work / phase / "output" / "last_model.pbuf"


def max_abs_difference(first: Path, second: Path) -> float | None:
    """The largest difference of one value between two saved models; None if either is missing."""
    if not (first.exists() and second.exists()):
        return None
    limit = max(first.stat().st_size, second.stat().st_size)
    one, two = read_model(first, limit), read_model(second, limit)
    if sorted(one) != sorted(two):
        return None
    return max(
        float(np.max(np.abs(np.asarray(one[k], np.float64) - np.asarray(two[k], np.float64))))
        for k in one
    )


def cpu(seconds: tuple[float, float] | None) -> float | None:
    """User + system seconds."""
    return None if seconds is None else sum(seconds)


def rounds_in_turns(
    run: Run,
    names: Sequence[str],
    kind: str,
    pairs: int,
    *,
    secure: Mapping[str, object] | None = None,
    privacy: Mapping[str, object] | None = None,
) -> tuple[list[RoundOutcome], list[RoundOutcome]]:
    """`pairs` plain rounds and as many with `secure` or `privacy` settings, in
    turns, so both meet the shared machine alike: the round's collaborators, model and
    tensors from the command line, phases named `KIND-plain-I` and `KIND-round-I`."""
    args = run.args
    members = names[: args.round_collaborators]
    common: dict[str, Any] = {
        "model_mb": args.round_model_mb,
        "tensors": args.round_tensors,
        "runner_settings": RUNNER,
    }
    plains: list[RoundOutcome] = []
    protected: list[RoundOutcome] = []
    for index in range(pairs):
        plains.append(measure_round(run, f"{kind}-plain-{index}", members, **common))
        protected.append(
            measure_round(
                run, f"{kind}-round-{index}", members, secure=secure, privacy=privacy, **common
            )
        )
    return plains, protected


def fastest(outcomes: Sequence[RoundOutcome]) -> RoundOutcome:
    """The round of `outcomes` that closed soonest (the first when none closed)."""
    closed = [outcome for outcome in outcomes if outcome.round_seconds is not None]
    return min(closed, key=lambda o: o.round_seconds or 0.0) if closed else outcomes[0]


def measure_secure_round(run: Run, names: Sequence[str]) -> None:
    """`secure_pairs` times a plain round then a secure one of the same sizes, in turns (so both
    meet the shared machine alike); the fastest of each kind side by side, as throughputs are
    the best of their samples; memory the largest peak of the secure rounds."""
    args = run.args
    plains, secures = rounds_in_turns(
        run, names, "secure", args.secure_pairs, secure=settings(args.secure_bits)
    )
    plain, secure = fastest(plains), fastest(secures)
    plain_errors = [error for outcome in plains for error in round_errors(outcome)]
    secure_errors = [error for outcome in secures for error in round_errors(outcome)]
    peaks = [outcome.peak_rss_mb for outcome in secures if outcome.peak_rss_mb is not None]
    rss = max(peaks, default=None)
    results = run.results
    results.update(
        secure_bits=args.secure_bits,
        secure_pairs=args.secure_pairs,
        secure_plain_round_seconds_samples=[o.round_seconds for o in plains],
        secure_round_seconds_samples=[o.round_seconds for o in secures],
        secure_aggregator_peak_rss_mb_samples=[o.peak_rss_mb for o in secures],
        secure_plain_round_seconds=plain.round_seconds,
        secure_round_seconds=secure.round_seconds,
        secure_round_over_plain=(
            None
            if plain.round_seconds is None or secure.round_seconds is None or secure_errors
            else secure.round_seconds / plain.round_seconds
        ),
        secure_plain_aggregator_peak_rss_mb=plain.peak_rss_mb,
        secure_aggregator_peak_rss_mb=rss,
        secure_rss_over_model=None if rss is None else rss / args.round_model_mb,
        secure_round_aggregator_rss_until_last_upload_mb=secure.rss_until_last_upload_mb,
        secure_round_aggregator_rss_after_last_upload_mb=secure.rss_after_last_upload_mb,
        secure_plain_upload_bytes=plain.upload_bytes,
        secure_upload_bytes=secure.upload_bytes,
        secure_upload_over_plain=(
            None
            if plain.upload_bytes is None or secure.upload_bytes is None
            else secure.upload_bytes / plain.upload_bytes
        ),
        secure_round_setup_seconds=span(secure.marks, "setup_start", "setup_end"),
        secure_round_mask_seconds_max=longest(secure.marks, "mask_start", "mask_end"),
        secure_round_mask_cpu_seconds_max=largest(secure.marks, "mask_cpu"),
        secure_round_unmask_seconds_max=longest(secure.marks, "unmask_start", "unmask_end"),
        secure_plain_round_upload_seconds_max=plain.upload_seconds_max,
        secure_round_upload_seconds_max=secure.upload_seconds_max,
        secure_plain_round_close_after_last_upload_seconds=plain.close_after_last_upload_seconds,
        secure_round_close_after_last_upload_seconds=secure.close_after_last_upload_seconds,
        secure_plain_round_aggregator_cpu_seconds=cpu(plain.aggregator_cpu_seconds),
        secure_round_aggregator_cpu_seconds=cpu(secure.aggregator_cpu_seconds),
        secure_plain_round_client_cpu_seconds=cpu(plain.client_cpu_seconds),
        secure_round_client_cpu_seconds=cpu(secure.client_cpu_seconds),
        secure_round_errors=len(plain_errors) + len(secure_errors),
        secure_model_max_abs_diff=max_abs_difference(
            final_model(run, "secure-plain-0"), final_model(run, "secure-round-0")
        ),
    )
    if plain_errors or secure_errors:
        results["secure_round_first_error"] = (plain_errors + secure_errors)[0]
    if secure.round_seconds is not None and plain.round_seconds is not None:
        say(
            f"secure round: {secure.collaborators} x {args.round_model_mb:g} MB in "
            f"{secure.round_seconds:.2f} s against {plain.round_seconds:.2f} s plain; aggregator "
            f"peak RSS {rss or 0:.0f} MB (plain {plain.peak_rss_mb or 0:.0f} MB)"
        )
    else:
        say(f"secure round: did not close; {(plain_errors + secure_errors)[:1]}")


def measure_setup(run: Run, names: Sequence[str]) -> None:
    """A secure round of `secure_setup_collaborators` sites and a small model: key setup and share
    exchange, with real RPCs against the real aggregator."""
    args = run.args
    members = names[: args.secure_setup_collaborators]
    outcome = measure_round(
        run,
        "secure-setup",
        members,
        model_mb=args.scale_model_kb / KIB,
        tensors=2,
        hold=False,
        runner_settings=RUNNER,
        secure=settings(args.secure_bits),
    )
    errors = round_errors(outcome)
    run.results.update(
        secure_setup_collaborators=outcome.collaborators,
        secure_setup_seconds=None if errors else span(outcome.marks, "setup_start", "setup_end"),
        secure_setup_site_seconds_max=longest(outcome.marks, "setup_start", "setup_end"),
        secure_setup_site_cpu_seconds_max=largest(outcome.marks, "setup_cpu"),
        secure_setup_round_seconds=outcome.wall_seconds,
        secure_setup_aggregator_cpu_seconds=cpu(outcome.aggregator_cpu_seconds),
        secure_setup_client_cpu_seconds=cpu(outcome.client_cpu_seconds),
        secure_setup_errors=len(errors),
    )
    if errors:
        run.results["secure_setup_first_error"] = errors[0]
    setup = run.results["secure_setup_seconds"]
    say(
        f"secure setup: {outcome.collaborators} sites' keys and shares in "
        f"{'-' if setup is None else f'{setup:.2f}'} s; {len(errors)} errors"
    )


def measure_neighbours(run: Run, names: Sequence[str]) -> None:
    """A secure round of `secure_scale_collaborators` sites, each masking with `neighbours` peers."""
    args = run.args
    members = names[: args.secure_scale_collaborators]
    outcome = measure_round(
        run,
        "secure-scale",
        members,
        model_mb=args.scale_model_kb / KIB,
        tensors=2,
        hold=False,
        runner_settings=RUNNER,
        secure=settings(args.secure_bits, args.secure_neighbours),
    )
    errors = round_errors(outcome)
    run.results.update(
        secure_scale_collaborators=outcome.collaborators,
        secure_scale_neighbours=args.secure_neighbours,
        secure_scale_round_seconds=outcome.wall_seconds,
        secure_scale_setup_seconds=span(outcome.marks, "setup_start", "setup_end"),
        secure_scale_aggregator_cpu_seconds=cpu(outcome.aggregator_cpu_seconds),
        secure_scale_aggregator_peak_rss_mb=outcome.peak_rss_mb,
        secure_scale_client_warnings=outcome.warnings,
        secure_scale_errors=len(errors),
    )
    if errors:
        run.results["secure_scale_first_error"] = errors[0]
    closed = "did not close" if outcome.wall_seconds is None else f"{outcome.wall_seconds:.2f} s"
    say(
        f"secure scale: {outcome.collaborators} sites with {args.secure_neighbours} neighbours "
        f"each: {closed}, {len(errors)} errors"
    )


def profile_secure_round(run: Run, names: Sequence[str]) -> dict[str, Any]:
    """The secure round again, its aggregator under cProfile: its costliest functions by own time."""
    args = run.args
    stats_file = run.work / "secure-round-profiled" / "aggregator.prof"
    outcome = measure_round(
        run,
        "secure-round-profiled",
        names[: args.round_collaborators],
        model_mb=args.round_model_mb,
        tensors=args.round_tensors,
        runner_settings=RUNNER,
        secure=settings(args.secure_bits),
        profile_to=stats_file,
    )
    return {
        "seconds_under_profiler": outcome.round_seconds,
        "what": f"the secure round ({args.round_collaborators} x {args.round_model_mb:g} MB)",
        "rpcs": list(PROFILED_RPCS),
        "top_tottime": top_functions(stats_file),
    }
