"""Sample-level DP-SGD at a site: its `dp_sgd` runner setting, and each round's secret seeds.

A runner that trains with DP-SGD (the PyTorch runner, `foedus.torch_runner`) reads one nested
runner setting, in the plan's `runner.settings` (shared defaults) or, whole, in a site's own
settings (`collaborator start --site-settings`, an envoy's `runner_settings`)::

    dp_sgd:
      noise_multiplier: 1.1   # or target_epsilon: 8 (the noise is then computed; not both)
      max_grad_norm: 1.0      # each record's gradient clipped to this L2 norm
      delta: 1.0e-5           # optional, 1e-5 unless set
      max_epsilon: 8          # optional, the site's own cap: only in a site's settings

`dp_sgd_settings` checks it (one line naming the file and key for each refusal);
`DpSgdSettings.training` turns it into the `PrivateTraining` the collaborator counts.
`round_seeds` draws a round's two seeds, Poisson sampling and noise, from the site's secret
(`foedus.privacy.secret`) and the round alone, by HKDF-SHA256: a round trained again gives the
same update, and neither the aggregator nor anyone holding the public plan can know them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from foedus.plans.reader import shown
from foedus.plans.runners import PrivateTraining, RunnerError
from foedus.plans.schema import RunnerSettings
from foedus.privacy.accountant import noise_for
from foedus.privacy.noise import SECRET_BYTES

DP_SGD = "dp_sgd"
DEFAULT_DELTA = 1e-5
KEYS = ("noise_multiplier", "target_epsilon", "max_grad_norm", "delta", "max_epsilon")
_SEED_LABEL = b"foedus.privacy.dp_sgd/v1 round seeds"


@dataclass(frozen=True)
class DpSgdSettings:
    """A site's `dp_sgd` setting, checked."""

    max_grad_norm: float
    delta: float = DEFAULT_DELTA
    noise_multiplier: float | None = None  # exactly one of noise_multiplier and target_epsilon
    target_epsilon: float | None = None
    max_epsilon: float | None = None
    where: str = f"runner.settings.{DP_SGD}"  # the file and key it was read from, for errors

    def training(self, sample_rate: float, steps: int, rounds: int) -> PrivateTraining:
        """What the collaborator counts for a round of `steps` steps at `sample_rate`: with a
        target epsilon, the least noise that keeps `rounds` such rounds within it."""
        noise = self.noise_multiplier
        if noise is None:
            if self.target_epsilon is None:
                raise RunnerError(f"{self.where}: neither noise_multiplier nor target_epsilon")
            try:
                noise = noise_for(self.target_epsilon, self.delta, sample_rate, steps, rounds)
            except ValueError as error:
                raise RunnerError(f"{self.where}.target_epsilon: {error}") from None
        return PrivateTraining(
            noise_multiplier=noise,
            sample_rate=sample_rate,
            steps=steps,
            delta=self.delta,
            max_epsilon=self.max_epsilon,
        )


def dp_sgd_settings(settings: RunnerSettings) -> DpSgdSettings | None:
    """The `dp_sgd` runner setting checked (None: not set, the site trains as it would without
    DP); `RunnerError` naming the file and key of the first thing wrong."""
    raw = settings.settings.get(DP_SGD)
    if raw is None:
        return None
    where = settings.key_path(DP_SGD)
    if not isinstance(raw, Mapping):
        raise RunnerError(f"{where}: expected a mapping of {', '.join(KEYS)}, got {shown(raw)}")
    unknown = sorted(str(key) for key in raw if key not in KEYS)
    if unknown:
        raise RunnerError(f"{where}.{unknown[0]}: not a DP-SGD setting (known: {', '.join(KEYS)})")

    def number(key: str, *, above: float = 0.0, below: float = math.inf) -> float | None:
        value = raw.get(key)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not above < value < below
            or not math.isfinite(value)
        ):
            bound = f"between {above:g} and {below:g}" if math.isfinite(below) else f"> {above:g}"
            raise RunnerError(f"{where}.{key}: expected a number {bound}, got {shown(value)}")
        return float(value)

    noise = number("noise_multiplier")
    target = number("target_epsilon")
    if (noise is None) == (target is None):
        raise RunnerError(
            f"{where}: set exactly one of noise_multiplier (the noise) and target_epsilon (the "
            f"epsilon the federation's rounds may spend; the noise is computed), "
            f"{'not both' if noise is not None else 'neither is set'}"
        )
    clip = number("max_grad_norm")
    if clip is None:
        raise RunnerError(
            f"{where}.max_grad_norm: missing: each record's gradient is clipped to this L2 norm"
        )
    delta = number("delta", below=1.0)
    return DpSgdSettings(
        max_grad_norm=clip,
        delta=DEFAULT_DELTA if delta is None else delta,
        noise_multiplier=noise,
        target_epsilon=target,
        max_epsilon=number("max_epsilon"),
        where=where,
    )


def round_seeds(secret: bytes, round_number: int) -> tuple[int, int]:
    """Round `round_number`'s two 64-bit seeds, (Poisson sampling, noise), from the site's
    secret: independent of each other and of every other round's, by HKDF-SHA256."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a privacy secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if not 0 <= round_number < 1 << 64:
        raise ValueError(f"a round number is 0 to 2^64 - 1, not {round_number}")
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=16,
        salt=None,
        info=_SEED_LABEL + round_number.to_bytes(8, "big"),
    ).derive(secret)
    return int.from_bytes(key[:8], "big"), int.from_bytes(key[8:], "big")
