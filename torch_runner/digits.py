"""The PyTorch example: a small CNN on scikit-learn's bundled digits images (8x8), `make demo-torch`.

The data and its shards are the built-in digits runner's (`foedus.collaborator.digits`: same seed,
same split, same keys in `runner.settings`), so the two demos learn from the same rows. One key
more, `device`, is a site's own (`collaborator start --site-settings`): `cpu` unless the site says
`cuda`, say. Only the loops are written here; `TorchRunner` does the rest.
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
from foedus.torch_runner.runner import LoopOutcome, TorchRunner

CLASSES: Final = 10
MOMENTUM: Final = 0.9


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (the first batch-normalised), a 2x2 max-pool and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of 1x8x8 images."""
        hidden = torch.relu(self.bn1(self.conv1(images)))
        hidden = torch.max_pool2d(torch.relu(self.conv2(hidden)), 2)
        logits: torch.Tensor = self.fc(hidden.flatten(1))
        return logits


class DigitsCNNRunner(TorchRunner):
    """`DigitsCNN` trained by SGD with momentum on this collaborator's shard of the digits."""

    @classmethod
    def build_module(cls, settings: RunnerSettings) -> nn.Module:
        """A fresh `DigitsCNN` (seeded by `TorchRunner`)."""
        return DigitsCNN()

    @classmethod
    def check_settings(cls, settings: RunnerSettings) -> tuple[DigitsSettings, torch.device]:
        """The digits runner's settings and the device, each bad key naming the plan or site file."""
        raw = dict(settings.settings)
        device = raw.pop("device", "cpu")
        options = DigitsSettings.parse(raw, settings.key_path)
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

    def fit(self, module: nn.Module) -> LoopOutcome:
        """`epochs` of minibatch SGD; the loss is the last epoch's mean."""
        optimizer = torch.optim.SGD(
            module.parameters(), lr=self.options.learning_rate, momentum=MOMENTUM
        )
        module.train()
        loss = math.nan
        for epoch in range(self.options.epochs):
            order = torch.randperm(len(self.train_y), generator=self.generator(epoch))
            total = 0.0
            for batch in order.split(self.options.batch_size):  # type: ignore[no-untyped-call]
                images = self.train_x[batch].to(self.device)
                targets = self.train_y[batch].to(self.device)
                optimizer.zero_grad()
                batch_loss = nn.functional.cross_entropy(module(images), targets)
                batch_loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total += float(batch_loss.detach()) * len(batch)
            loss = total / len(self.train_y)
        return LoopOutcome(metrics={"loss": loss}, data_size=len(self.train_y))

    def evaluate(self, module: nn.Module) -> LoopOutcome:
        """Accuracy and mean cross-entropy on this collaborator's test shard."""
        module.eval()
        logits = module(self.test_x.to(self.device))
        targets = self.test_y.to(self.device)
        accuracy = float((logits.argmax(1) == targets).float().mean())
        loss = float(nn.functional.cross_entropy(logits, targets))
        return LoopOutcome(metrics={"accuracy": accuracy, "loss": loss}, data_size=len(targets))
