"""`bench.py`'s dp part: what DP-FedAvg costs a round, beside plain rounds of the same run.

A real aggregator (`aggregator start`) and collaborator threads running the real loop (each site
clipping its update, as `collaborator start` does), the no-op runner adding `TRAIN_DELTA` to
every value: `round_collaborators` x `round_model_mb` (the round part's sizes), a plain round then
a DP-FedAvg one (`differential_privacy` with `CLIP` and `NOISE_MULTIPLIER`), in turns,
`dp_pairs` times, the fastest of each kind side by side: `dp_round_over_plain` (first download
to the aggregator's round line), and the aggregator's close after the last upload of each (the
DP close clips every upload again, adds the noise of the whole model and averages; the plain
one averages). The aggregator makes the uploads' clip factors and the noise while the round is
open (`aggregator/dp_ahead.py`), so the DP round's CPU is in the round, and its noise held in
the aggregator's peak memory (`dp_aggregator_peak_rss_mb`).
"""

from __future__ import annotations

from collections.abc import Sequence

# isort: split
# The benchmark's own modules, beside this file.
from harness import Run, say
from secure_cost import cpu, fastest, round_errors, rounds_in_turns

CLIP = 1.0  # below the update's norm (every value moved by 2**-10): each upload is clipped
NOISE_MULTIPLIER = 1.0


def settings() -> dict[str, object]:
    """The plan's `differential_privacy` section of every DP round here (no epsilon cap)."""
    return {"enabled": True, "clip": CLIP, "noise_multiplier": NOISE_MULTIPLIER}


def ratio(over: float | None, under: float | None) -> float | None:
    """`over / under`, None when either was not measured."""
    return None if over is None or under is None or under <= 0 else over / under


def measure_phase(run: Run, names: Sequence[str]) -> None:
    """`dp_pairs` times a plain round then a DP one of the same sizes, in turns (so both meet the
    shared machine alike); the fastest of each kind side by side."""
    args = run.args
    plains, privates = rounds_in_turns(run, names, "dp", args.dp_pairs, privacy=settings())
    plain, private = fastest(plains), fastest(privates)
    errors = [error for outcome in plains + privates for error in round_errors(outcome)]
    plain_close = plain.close_after_last_upload_seconds
    private_close = private.close_after_last_upload_seconds
    run.results.update(
        dp_pairs=args.dp_pairs,
        dp_clip=CLIP,
        dp_noise_multiplier=NOISE_MULTIPLIER,
        dp_plain_round_seconds_samples=[o.round_seconds for o in plains],
        dp_round_seconds_samples=[o.round_seconds for o in privates],
        dp_plain_round_seconds=plain.round_seconds,
        dp_round_seconds=private.round_seconds,
        dp_round_over_plain=None if errors else ratio(private.round_seconds, plain.round_seconds),
        dp_plain_round_close_after_last_upload_seconds=plain_close,
        dp_round_close_after_last_upload_seconds=private_close,
        dp_close_over_plain=ratio(private_close, plain_close),
        dp_plain_round_download_seconds_max=plain.download_seconds_max,
        dp_round_download_seconds_max=private.download_seconds_max,
        dp_plain_round_upload_seconds_max=plain.upload_seconds_max,
        dp_round_upload_seconds_max=private.upload_seconds_max,
        dp_plain_round_client_cpu_seconds=cpu(plain.client_cpu_seconds),
        dp_round_client_cpu_seconds=cpu(private.client_cpu_seconds),
        dp_plain_round_aggregator_cpu_seconds=cpu(plain.aggregator_cpu_seconds),
        dp_round_aggregator_cpu_seconds=cpu(private.aggregator_cpu_seconds),
        dp_plain_aggregator_peak_rss_mb=plain.peak_rss_mb,
        dp_aggregator_peak_rss_mb=private.peak_rss_mb,
        dp_round_errors=len(errors),
    )
    if errors:
        run.results["dp_round_first_error"] = errors[0]
    if private.round_seconds is not None and plain.round_seconds is not None:
        say(
            f"dp round: {private.collaborators} x {args.round_model_mb:g} MB in "
            f"{private.round_seconds:.2f} s against {plain.round_seconds:.2f} s plain; close "
            f"after the last upload {private_close or 0:.2f} s (plain {plain_close or 0:.2f} s)"
        )
    else:
        say(f"dp round: did not close; {errors[:1]}")
