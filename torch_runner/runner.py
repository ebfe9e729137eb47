"""`TorchRunner`: a task runner around a `torch.nn.Module`; a subclass writes only its loops.

A subclass gives `build_module` (the architecture), `fit` (its training loop over this site's
data) and `evaluate` (its evaluation loop), loads its data in `setup`, and checks its settings in
`check_settings` (so a director and `aggregator start` refuse a typo before anything starts).
The base class does the rest of the `foedus.plans.runners.TaskRunner` contract: the seeded initial
model, the global model copied into the module (checked first: names, shapes and dtypes), the
trained state dict handed back as named arrays, bit for bit, and buffers kept at the site when
asked (`keep_local`).

Randomness in `fit` comes from the plan's seed, the site and the round, never from state of the
process, so a collaborator killed and started again trains each round as it would have:
`generator(epoch)` shuffles an epoch, and PyTorch's global generator (dropout, augmentation, a
`DataLoader`'s own shuffling) is seeded from (seed, site, round) before each `fit`.

Sample-level DP-SGD (the `dp_sgd` runner setting, `foedus.privacy.dp_sgd`) with Opacus, for a
subclass that says how it samples (`sampling`) and whose `fit` takes its batches from
`self.batches(epoch)` and wraps its optimizer in `self.optimizer(...)`. Without `dp_sgd` both
are what the loop would do anyway: shuffled batches, the optimizer itself. With it, `train`
wraps the module in Opacus's `GradSampleModule` (per-record gradients) for `fit`;
`self.optimizer` makes a `DPOptimizer` that clips each record's gradient to `max_grad_norm`
and adds Gaussian noise of std noise_multiplier x max_grad_norm to their sum at each step
(`secure_mode`: the noise robust to floating-point attacks); `self.batches` draws each step's
batch by Poisson sampling, each record in it with probability batch_size / records, `steps`
batches an epoch. Both generators, sampling and noise, are seeded from the site's privacy
secret and the round (`private_training`, `foedus.privacy.dp_sgd.round_seeds`), never from
`runner.seed`: the plan is public, and noise or batches anyone can compute protect nothing. A
round trained again gives the same bytes, so it is never spent twice. After `fit`, the base
class checks that the DP optimizer made exactly the steps the collaborator counted, on the
batches `self.batches` drew, else it raises `PrivateTrainingError` and nothing is sent: a
loop that bypassed the helpers would train without privacy while the ledger says it had.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from foedus.plans.runners import (
    Array,
    Model,
    PrivateTraining,
    RunnerError,
    TrainOutcome,
    Validation,
)
from foedus.plans.schema import RunnerSettings
from foedus.privacy.dp_sgd import DP_SGD, DpSgdSettings, dp_sgd_settings, round_seeds
from foedus.torch_runner.state import load_arrays, module_arrays

# Independent random streams of one site and round, as numpy seeds them: SeedSequence((seed,
# stream, site index, round, ...)).
_SHUFFLE_STREAM: Final = 0
_GLOBAL_STREAM: Final = 1
_FIRST_LAYER_HOOK: Final = "Full backward hook is firing when gradients are computed with respect"


class PrivateTrainingError(RuntimeError):
    """`fit` did not train as DP-SGD counted it (steps, batches): nothing of the round is sent."""


@dataclass(frozen=True)
class Sampling:
    """How a subclass's `fit` goes over its data in a round: what DP-SGD's accountant needs."""

    records: int  # this site's training records
    batch_size: int  # records per batch (the expected batch under DP-SGD's Poisson sampling)
    epochs: int  # passes over the data per round

    @property
    def steps_per_epoch(self) -> int:
        """Batches an epoch: ceil(records / batch_size), with or without DP-SGD."""
        return math.ceil(self.records / self.batch_size)

    @property
    def sample_rate(self) -> float:
        """Each record's Poisson probability per step under DP-SGD: batch_size / records."""
        return min(1.0, self.batch_size / self.records)

    @property
    def expected_batch(self) -> int:
        """The records a Poisson batch holds on average (what a mean loss is divided by)."""
        return min(self.batch_size, self.records)


@dataclass
class _Private:
    """The round's DP-SGD state while `fit` runs."""

    sampling_generator: torch.Generator
    noise_generator: torch.Generator
    steps: int = 0  # DP optimizer steps made
    batches: int = 0  # batches drawn by `batches`


@dataclass(frozen=True)
class LoopOutcome:
    """What `fit` and `evaluate` return: metrics (such as `loss`, `accuracy`) and the samples seen."""

    metrics: dict[str, float]
    data_size: int


class TorchRunner:
    """The base class of PyTorch task runners; see the module docstring for what to override."""

    # fnmatch patterns of state dict names kept at each site, never sent nor averaged: FedBN,
    # say, keeps BatchNorm's statistics local with ("*.running_mean", "*.running_var",
    # "*.num_batches_tracked"). The same on every party: the global model is what is not local.
    keep_local: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> None:
        """Build this site's module (the same seeded one as every party's) and load its data."""
        self.settings = settings
        self.collaborator = collaborator
        self.collaborators = collaborators
        self.index = collaborators.index(collaborator)
        self.round_number = 0  # the round `train` works on: with the seed and site, its randomness
        self.device = torch.device("cpu")  # `setup` may choose another (a site's own setting)
        type(self).check_settings(settings)  # the director's and the aggregator's check, too
        self.dp = type(self).private_settings(settings)  # the subclass's check may not call it
        self.setup()  # before the module: a bad setting is refused before anything is built
        self.module = type(self).seeded_module(settings).to(self.device)
        self._secret: bytes | None = None  # the site's privacy secret, under DP-SGD
        self._training: PrivateTraining | None = None
        self._private: _Private | None = None  # while `fit` runs under DP-SGD

    # --- what a subclass writes ------------------------------------------------------------

    @classmethod
    def build_module(cls, settings: RunnerSettings) -> torch.nn.Module:
        """The model's architecture, freshly initialised (the base class seeds PyTorch first)."""
        raise NotImplementedError(f"{cls.__name__} must define build_module")

    @classmethod
    def check_settings(cls, settings: RunnerSettings) -> object:
        """Refuse bad `runner.settings` with `RunnerError` (`settings.key_path(key)`); reads no data.

        Run on the plan's settings alone by the director at submit and by `aggregator start`,
        and on the merged settings by `__init__` at each site, before `setup`. The base class
        takes everything; a subclass that reads settings overrides it.
        """
        return None

    def sampling(self) -> Sampling:
        """How `fit` goes over the data (records, batch size, epochs), once `setup` loaded it:
        needed only for DP-SGD, whose accountant counts the steps and the sampling rate."""
        raise RunnerError(
            f"{DP_SGD}: {type(self).__name__} does not say how it samples its data (define "
            "sampling), so it cannot train with DP-SGD"
        )

    def setup(self) -> None:
        """Load this site's data (`self.index` of the plan's collaborators), once `check_settings` passed."""

    def fit(self, module: torch.nn.Module) -> LoopOutcome:
        """Train `module` in place on this site's data for `self.round_number` (shuffle with `generator`)."""
        raise NotImplementedError(f"{type(self).__name__} must define fit")

    def evaluate(self, module: torch.nn.Module) -> LoopOutcome:
        """Measure `module` on this site's held-out data (no training)."""
        raise NotImplementedError(f"{type(self).__name__} must define evaluate")

    # --- what `fit` uses ---------------------------------------------------------------------

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """The index batches of `epoch` in this round: a shuffle cut in `batch_size` pieces, or
        under DP-SGD `steps_per_epoch` Poisson samples (each record in with probability
        batch_size / records, drawn from the site's secret; a batch may be empty)."""
        sampling = self.sampling()
        private = self._private
        if private is None:
            order = torch.randperm(sampling.records, generator=self.generator(epoch))
            yield from order.split(sampling.batch_size)  # type: ignore[no-untyped-call]
            return
        for _ in range(sampling.steps_per_epoch):
            drawn = torch.rand(sampling.records, generator=private.sampling_generator)
            private.batches += 1
            yield torch.nonzero(drawn < sampling.sample_rate).flatten()

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`optimizer` itself, or under DP-SGD Opacus's `DPOptimizer` around it: each record's
        gradient clipped to max_grad_norm, Gaussian noise from the site's secret on their sum."""
        private, dp = self._private, self.dp
        if private is None or dp is None or self._training is None:
            return optimizer
        wrapped = DPOptimizer(
            optimizer,
            noise_multiplier=self._training.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=self.sampling().expected_batch,
            generator=private.noise_generator,
            secure_mode=True,
        )

        def count(_: DPOptimizer) -> None:
            private.steps += 1

        wrapped.attach_step_hook(count)
        dp_optimizer: torch.optim.Optimizer = wrapped
        return dp_optimizer

    # --- the TaskRunner contract -------------------------------------------------------------

    @classmethod
    def private_settings(cls, settings: RunnerSettings) -> DpSgdSettings | None:
        """The `dp_sgd` setting checked, and the module checked trainable by Opacus per record
        (no BatchNorm, say); `RunnerError` naming the key. A subclass's `check_settings` calls
        it, so a director and `aggregator start` refuse it too."""
        dp = dp_sgd_settings(settings)
        if dp is None:
            return None
        module = cls.seeded_module(settings)
        module.train()
        problems = ModuleValidator.validate(module, strict=False)
        if problems:
            raise RunnerError(
                f"{settings.key_path(DP_SGD)}: Opacus cannot train this model per record: "
                + "; ".join(str(problem) for problem in problems)
            )
        return dp

    def private_training(self, secret: bytes, rounds: int) -> PrivateTraining | None:
        """DP-SGD as `dp_sgd` says (None: not set), the secret kept for each round's draws."""
        if self.dp is None:
            return None
        sampling = self.sampling()
        if sampling.records < 1 or sampling.batch_size < 1 or sampling.epochs < 1:
            raise RunnerError(
                f"{DP_SGD}: {type(self).__name__} samples {sampling}: DP-SGD needs a record, a "
                "batch and an epoch at least"
            )
        self._secret = secret
        self._training = self.dp.training(
            sampling.sample_rate, sampling.epochs * sampling.steps_per_epoch, rounds
        )
        return self._training

    @classmethod
    def seeded_module(cls, settings: RunnerSettings) -> torch.nn.Module:
        """`build_module` under `runner.seed`: the same weights on every party, the global RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            return cls.build_module(settings)

    @classmethod
    def shared(cls, name: str) -> bool:
        """Whether state dict tensor `name` is part of the global model (not kept local)."""
        return not any(fnmatch.fnmatchcase(name, pattern) for pattern in cls.keep_local)

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Array]:
        """The seeded module's shared state dict as named arrays (what the aggregator starts from)."""
        return module_arrays(cls.seeded_module(settings), cls.shared)

    def generator(self, epoch: int) -> torch.Generator:
        """A generator for `epoch`'s shuffling in this round, from (seed, site, round, epoch)."""
        generator = torch.Generator()
        generator.manual_seed(self._seed(_SHUFFLE_STREAM, self.round_number, epoch))
        return generator

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Copy `model` into the module, run `fit` for `round_number`, hand back the shared state dict."""
        self.load(model)
        self.round_number = round_number
        # Dropout, augmentation and DataLoader shuffles draw from the global generator: seeded
        # from the round, they repeat when a restarted collaborator trains this round again.
        torch.manual_seed(self._seed(_GLOBAL_STREAM, round_number))
        outcome = self.fit(self.module) if self.dp is None else self._fit_privately(round_number)
        return TrainOutcome(
            model=module_arrays(self.module, self.shared),
            metrics=outcome.metrics,
            data_size=outcome.data_size,
        )

    def _fit_privately(self, round_number: int) -> LoopOutcome:
        """`fit` on the module wrapped for per-record gradients, with the round's generators
        from the secret; `PrivateTrainingError` unless it made the steps counted."""
        if self._secret is None or self._training is None:
            raise PrivateTrainingError(
                "dp_sgd is set but private_training was not called: the collaborator calls it "
                "with the site's secret before the first round"
            )
        sampling_seed, noise_seed = round_seeds(self._secret, round_number)
        private = _Private(torch.Generator(), torch.Generator())
        private.sampling_generator.manual_seed(sampling_seed)
        private.noise_generator.manual_seed(noise_seed)
        wrapped = GradSampleModule(self.module)
        self._private = private
        try:
            with warnings.catch_warnings():
                # Opacus's per-record hooks on a first layer, whose input needs no gradient.
                warnings.filterwarnings("ignore", message=_FIRST_LAYER_HOOK, category=UserWarning)
                outcome = self.fit(wrapped)
        finally:
            self._private = None
            wrapped.cleanup()  # the hooks and per-record gradients off the module
        planned = self._training.steps
        if private.steps != planned or private.batches != planned:
            raise PrivateTrainingError(
                f"round {round_number}: fit made {private.steps} DP-SGD optimizer steps on "
                f"{private.batches} batches from self.batches; DP-SGD counted {planned} of each "
                "(take every batch from self.batches and step self.optimizer(...) once on each)"
            )
        return outcome

    def validate(self, model: Model) -> Validation:
        """Copy `model` into the module, run `evaluate`."""
        self.load(model)
        with torch.no_grad():
            outcome = self.evaluate(self.module)
        return Validation(metrics=outcome.metrics, data_size=outcome.data_size)

    def load(self, model: Mapping[str, Array]) -> None:
        """The global model into the module, after checking it fits (`ModelMismatchError`)."""
        load_arrays(self.module, model, self.shared)

    def _seed(self, stream: int, *keys: int) -> int:
        """A 64-bit seed from (runner.seed, stream, site index, keys): independent per stream."""
        entropy = (self.settings.seed, stream, self.index, *keys)
        (seed,) = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
        return int(seed)
