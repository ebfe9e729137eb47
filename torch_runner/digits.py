"""The PyTorch example: a small CNN on scikit-learn's bundled digits images (8x8), `make demo-torch`.

The data and its shards are the built-in digits runner's (`foedus.collaborator.digits`: same seed,
same split, same keys in `runner.settings`), so the two demos learn from the same rows. Keys
more: `device`, a site's own (`collaborator start --site-settings`): `cpu` unless the site says
`cuda`, say; `norm`, the plan's (every party builds the same model from it): `batch` (default,
BatchNorm) or `group` (GroupNorm, which DP-SGD needs: Opacus cannot train BatchNorm per record);
and `dp_sgd` (`foedus.privacy.dp_sgd`) for sample-level DP-SGD. Only the loops are written
here; `TorchRunner` does the rest, DP-SGD included (`batches`, `optimizer`).
"""

from __future__ import annotations

import math
from typing import Final

import torch
from torch import nn

from foedus.collaborator.digits import DigitsSettings, load_data, make_shards
from foedus.plans.reader import shown
from foedus.plans.runners import RunnerError
from foedus.plans.schema import RunnerSettings
from foedus.privacy.dp_sgd import DP_SGD
from foedus.torch_runner.runner import LoopOutcome, Sampling, TorchRunner

CLASSES: Final = 10
MOMENTUM: Final = 0.9
NORMS: Final = ("batch", "group")
GROUPS: Final = 4  # GroupNorm's groups of the first convolution's 16 channels


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (the first normalised: BatchNorm, or GroupNorm for DP-SGD), a 2x2
    max-pool and a linear layer."""

    def __init__(self, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        # Registered under one name only (a second attribute would put its tensors twice in the
        # state dict): bn1 as the model was before `norm`, gn1 for GroupNorm.
        self.norm1 = "gn1" if norm == "group" else "bn1"
        if norm == "group":
            self.gn1 = nn.GroupNorm(GROUPS, 16)
        else:
            self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of 1x8x8 images."""
        hidden = torch.relu(self.get_submodule(self.norm1)(self.conv1(images)))
        hidden = torch.max_pool2d(torch.relu(self.conv2(hidden)), 2)
        logits: torch.Tensor = self.fc(hidden.flatten(1))
        return logits


class DigitsCNNRunner(TorchRunner):
    """`DigitsCNN` trained by SGD with momentum on this collaborator's shard of the digits."""

    @classmethod
    def build_module(cls, settings: RunnerSettings) -> nn.Module:
        """A fresh `DigitsCNN` (seeded by `TorchRunner`), normalised as `norm` says."""
        return DigitsCNN(_norm(settings))

    @classmethod
    def check_settings(cls, settings: RunnerSettings) -> tuple[DigitsSettings, torch.device]:
        """The digits runner's settings and the device, each bad key naming the plan or site file."""
        raw = dict(settings.settings)
        device = raw.pop("device", "cpu")
        norm = raw.pop("norm", "batch")
        dp_sgd = raw.pop(DP_SGD, None)
        options = DigitsSettings.parse(raw, settings.key_path)
        if norm not in NORMS:
            raise RunnerError(
                f"{settings.key_path('norm')}: expected one of {', '.join(NORMS)}, got "
                f"{shown(norm)}"
            )
        if "norm" in settings.site_keys:
            raise RunnerError(
                f"{settings.key_path('norm')}: the model's norm is the plan's "
                "(runner.settings.norm): every party builds the same model from it"
            )
        if dp_sgd is not None and norm == "batch":
            raise RunnerError(
                f"{settings.key_path(DP_SGD)}: DP-SGD cannot train BatchNorm per record "
                "(Opacus): set norm: group in the plan's runner.settings"
            )
        cls.private_settings(settings)
        try:
            return options, torch.device(device)  # type: ignore[call-overload]
        except (RuntimeError, TypeError):
            raise RunnerError(
                f"{settings.key_path('device')}: expected a PyTorch device such as cpu or "
                f"cuda, got {shown(device)}"
            ) from None

    def setup(self) -> None:
        """This shard of the digits, with the settings `check_settings` read."""
        self.options, self.device = self.check_settings(self.settings)
        torch.set_num_threads(1)  # small batches: threads cost more than they give
        features, labels = load_data()
        shard = make_shards(
            labels,
            self.options,
            seed=self.settings.seed,
            count=len(self.collaborators),
            key_path=self.settings.key_path,
        )[self.index]
        images = torch.from_numpy(features).float().reshape(-1, 1, 8, 8)
        targets = torch.from_numpy(labels)
        self.train_x, self.train_y = images[shard.train], targets[shard.train]
        self.test_x, self.test_y = images[shard.test], targets[shard.test]

    def sampling(self) -> Sampling:
        """This shard's training rows, in batches of `batch_size`, `epochs` times a round."""
        return Sampling(len(self.train_y), self.options.batch_size, self.options.epochs)

    def fit(self, module: nn.Module) -> LoopOutcome:
        """`epochs` of minibatch SGD; the loss is the last epoch's mean per record."""
        optimizer = self.optimizer(
            torch.optim.SGD(module.parameters(), lr=self.options.learning_rate, momentum=MOMENTUM)
        )
        module.train()
        loss = math.nan
        for epoch in range(self.options.epochs):
            total, seen = 0.0, 0
            for batch in self.batches(epoch):
                images = self.train_x[batch].to(self.device)
                targets = self.train_y[batch].to(self.device)
                optimizer.zero_grad()
                batch_loss = nn.functional.cross_entropy(module(images), targets)
                batch_loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()  # under DP-SGD an empty batch is a step too: noise alone
                if len(batch):
                    total += float(batch_loss.detach()) * len(batch)
                    seen += len(batch)
            loss = total / seen if seen else math.nan
        return LoopOutcome(metrics={"loss": loss}, data_size=len(self.train_y))

    def evaluate(self, module: nn.Module) -> LoopOutcome:
        """Accuracy and mean cross-entropy on this collaborator's test shard."""
        module.eval()
        logits = module(self.test_x.to(self.device))
        targets = self.test_y.to(self.device)
        accuracy = float((logits.argmax(1) == targets).float().mean())
        loss = float(nn.functional.cross_entropy(logits, targets))
        return LoopOutcome(metrics={"accuracy": accuracy, "loss": loss}, data_size=len(targets))


def _norm(settings: RunnerSettings) -> str:
    """The plan's `norm` (`batch` unless set; `check_settings` refuses anything else)."""
    norm = settings.settings.get("norm", "batch")
    return norm if isinstance(norm, str) and norm in NORMS else "batch"
