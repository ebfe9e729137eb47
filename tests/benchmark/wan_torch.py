"""The wide-area round's real model as a PyTorch runner: a wide MLP on the digits, one epoch a round.

`runner.settings`: the digits runner's (`split`, `test_fraction`, `epochs`, `batch_size`,
`learning_rate`; `foedus.torch_runner.digits`: the same data, shards and SGD with momentum),
`width`, the hidden layers' width (`wan_model.width_for` gives it for a size in MiB), and
`train_images`, the first that many of a site's training images (0, the default: its whole shard),
so an epoch can be a few steps and the round measure the transport, the update still SGD's. Run by the
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
OWN_KEYS = ("width", "train_images")  # this runner's keys; the rest are the digits CNN runner's


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
        """`width` and `train_images` checked, the rest as the digits CNN runner checks it."""
        width = settings.settings.get("width")
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
            raise RunnerError(
                f"{settings.key_path('width')}: expected an integer 1-{MAX_WIDTH}, got "
                f"{shown(width)}"
            )
        images = settings.settings.get("train_images", 0)
        if isinstance(images, bool) or not isinstance(images, int) or images < 0:
            raise RunnerError(
                f"{settings.key_path('train_images')}: expected an integer >= 0 (0: the whole "
                f"shard), got {shown(images)}"
            )
        rest = {key: value for key, value in settings.settings.items() if key not in OWN_KEYS}
        return super().check_settings(_with_settings(settings, rest))

    def setup(self) -> None:
        """The digits CNN runner's shard, its training images cut to `train_images` (0: all)."""
        super().setup()
        images = _train_images(self.settings)
        if images:
            self.train_x, self.train_y = self.train_x[:images], self.train_y[:images]


def _width(settings: RunnerSettings) -> int:
    """The plan's `width` (`check_settings` refuses anything but an integer in range)."""
    width = settings.settings.get("width")
    return width if isinstance(width, int) else 1


def _train_images(settings: RunnerSettings) -> int:
    """The plan's `train_images` (0 unless set: the whole shard)."""
    images = settings.settings.get("train_images", 0)
    return images if isinstance(images, int) else 0


def _with_settings(settings: RunnerSettings, raw: dict[str, object]) -> RunnerSettings:
    """`settings` with other `runner.settings`."""
    return replace(settings, settings=raw)
