"""The wide-area round's real model as a PyTorch runner: a wide MLP on the digits, one epoch a round.

`runner.settings`: the digits runner's (`split`, `test_fraction`, `epochs`, `batch_size`,
`learning_rate`; `foedus.torch_runner.digits`: the same data, shards and SGD with momentum) and
`width`, the hidden layers' width (`wan_model.width_for` gives it for a size in MiB). Run by the
benchmark under `.venv-torch`'s interpreter (`make torch-env`); not checked by `make lint`'s
mypy, whose `.venv` has no PyTorch: `.venv-torch/bin/mypy --strict` checks it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from foedus.collaborator.digits import DigitsSettings
from foedus.plans.reader import shown
from foedus.plans.runners import RunnerError
from foedus.plans.schema import RunnerSettings
from foedus.torch_runner.digits import DigitsCNNRunner

# isort: split
# The benchmark's own modules, beside this file.
from wan_model import layer_sizes

MAX_WIDTH = 65_536


class WideDigitsRunner(DigitsCNNRunner):
    """`DigitsCNNRunner`'s data and loops with a wide MLP in place of its small CNN."""

    @classmethod
    def build_module(cls, settings: RunnerSettings) -> nn.Module:
        """Linear layers of `layer_sizes(width)`, ReLU between them, seeded by `TorchRunner`."""
        layers: list[nn.Module] = [nn.Flatten()]
        for inputs, outputs in layer_sizes(_width(settings)):
            layers += [nn.Linear(inputs, outputs), nn.ReLU()]
        return nn.Sequential(*layers[:-1])  # logits out: no ReLU after the last layer

    @classmethod
    def check_settings(cls, settings: RunnerSettings) -> tuple[DigitsSettings, torch.device]:
        """`width` checked, the rest as the digits CNN runner checks it."""
        width = settings.settings.get("width")
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
            raise RunnerError(
                f"{settings.key_path('width')}: expected an integer 1-{MAX_WIDTH}, got "
                f"{shown(width)}"
            )
        rest = {key: value for key, value in settings.settings.items() if key != "width"}
        return super().check_settings(_with_settings(settings, rest))


def _width(settings: RunnerSettings) -> int:
    """The plan's `width` (`check_settings` refuses anything but an integer in range)."""
    width = settings.settings.get("width")
    return width if isinstance(width, int) else 1


def _with_settings(settings: RunnerSettings, raw: dict[str, object]) -> RunnerSettings:
    """`settings` with other `runner.settings`."""
    return replace(settings, settings=raw)
