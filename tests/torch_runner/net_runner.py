"""Small PyTorch runners for the tests: every state dict dtype, buffers, and models that differ.

`NetRunner`'s module holds float32 weights, a bfloat16 parameter and BatchNorm's buffers (float32
statistics, an int64 counter); the federation tests run it in real processes (this folder on
PYTHONPATH).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from foedus.plans.runners import Model, TrainOutcome
from foedus.plans.schema import RunnerSettings
from foedus.torch_runner import LoopOutcome, Sampling, TorchRunner
from foedus.torch_runner.digits import DigitsCNNRunner

from dying_runner import TRAIN, die_if_armed


class Net(nn.Module):
    """A linear layer after BatchNorm (buffers: float32 statistics, an int64 counter), a bfloat16 scale."""

    def __init__(self, features: int = 6, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, 3).to(dtype)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of feature rows."""
        logits: torch.Tensor = self.fc(self.bn(x).to(self.fc.weight.dtype)).float()
        return logits * self.scale.float()


class NetRunner(TorchRunner):
    """A runner whose loops feed fixed random rows: enough to move weights and statistics."""

    features: ClassVar[int] = 6
    dtype: ClassVar[torch.dtype] = torch.float32

    @classmethod
    def build_module(cls, settings: RunnerSettings) -> nn.Module:
        return Net(cls.features, cls.dtype)

    def setup(self) -> None:
        torch.set_num_threads(1)  # the same reductions in every process: the replay's bits
        generator = torch.Generator().manual_seed(self.index)
        self.x = torch.randn(32, self.features, generator=generator)
        self.y = torch.randint(0, 3, (32,), generator=generator)

    def fit(self, module: nn.Module) -> LoopOutcome:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        module.train()
        for batch in torch.randperm(32, generator=self.generator(0)).split(8):  # type: ignore[no-untyped-call]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(self.x[batch]), self.y[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        return LoopOutcome({"loss": float(loss.detach())}, 32)

    def evaluate(self, module: nn.Module) -> LoopOutcome:
        module.eval()
        accuracy = float((module(self.x).argmax(1) == self.y).float().mean())
        return LoopOutcome({"accuracy": accuracy}, 32)


class LocalStatisticsRunner(NetRunner):
    """FedBN: BatchNorm's statistics stay at each site."""

    keep_local = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


class WiderRunner(NetRunner):
    features = 8


class HalfRunner(NetRunner):
    dtype = torch.float16


class DropoutNet(Net):
    """`Net` with dropout on its logits while training: randomness from PyTorch's global generator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch, half of them dropped while training."""
        return nn.functional.dropout(super().forward(x), 0.5, training=self.training)


class DropoutRunner(NetRunner):
    """`NetRunner` on `DropoutNet`."""

    @classmethod
    def build_module(cls, settings: RunnerSettings) -> nn.Module:
        return DropoutNet(cls.features, cls.dtype)


class DyingCNNRunner(DigitsCNNRunner):
    """The CNN example; armed (`dying_runner`), it dies once in the middle of a train task."""

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Train as the example does; armed for this round, die before returning."""
        outcome = super().train(model, round_number)
        die_if_armed(round_number, TRAIN)
        return outcome


class LinearDpRunner(TorchRunner):
    """A linear map without bias, every record's gradient 100 x a unit vector: DP-SGD clips each
    to `max_grad_norm`, so one step's update is known but for its noise. `records` records in
    batches of `batch` (all of them by default: sample rate 1, one step a round); SGD, lr 1."""

    features: ClassVar[int] = 2000
    records: ClassVar[int] = 8
    batch: ClassVar[int] = 8

    @classmethod
    def build_module(cls, settings: RunnerSettings) -> nn.Module:
        return nn.Linear(cls.features, 1, bias=False)

    def setup(self) -> None:
        torch.set_num_threads(1)
        unit = torch.ones(self.features) / self.features**0.5
        self.x = (100 * unit).repeat(self.records, 1)

    def sampling(self) -> Sampling:
        return Sampling(self.records, self.batch, epochs=1)

    def fit(self, module: nn.Module) -> LoopOutcome:
        optimizer = self.optimizer(torch.optim.SGD(module.parameters(), lr=1.0))
        module.train()
        self.batch_sizes: list[int] = []  # of the last round, for the tests
        for batch in self.batches(0):
            self.batch_sizes.append(len(batch))
            optimizer.zero_grad()
            module(self.x[batch]).mean().backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        return LoopOutcome({}, self.records)

    def evaluate(self, module: nn.Module) -> LoopOutcome:
        return LoopOutcome({}, self.records)


class SmallBatchDpRunner(LinearDpRunner):
    """Expected batches of one of 4 records: a Poisson batch is often empty."""

    features = 4
    records = 4
    batch = 1


class BypassingRunner(LinearDpRunner):
    """Its loop uses its own optimizer, not `self.optimizer`: no clipping, no noise."""

    def fit(self, module: nn.Module) -> LoopOutcome:
        optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
        for batch in self.batches(0):
            optimizer.zero_grad()
            module(self.x[batch]).mean().backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        return LoopOutcome({}, self.records)
