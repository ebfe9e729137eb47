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
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np
import torch

from foedus.plans.runners import Array, Model, TrainOutcome, Validation
from foedus.plans.schema import RunnerSettings
from foedus.torch_runner.state import load_arrays, module_arrays

# Independent random streams of one site and round, as numpy seeds them: SeedSequence((seed,
# stream, site index, round, ...)).
_SHUFFLE_STREAM: Final = 0
_GLOBAL_STREAM: Final = 1


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
        self.setup()  # before the module: a bad setting is refused before anything is built
        self.module = type(self).seeded_module(settings).to(self.device)

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

    def setup(self) -> None:
        """Load this site's data (`self.index` of the plan's collaborators), once `check_settings` passed."""

    def fit(self, module: torch.nn.Module) -> LoopOutcome:
        """Train `module` in place on this site's data for `self.round_number` (shuffle with `generator`)."""
        raise NotImplementedError(f"{type(self).__name__} must define fit")

    def evaluate(self, module: torch.nn.Module) -> LoopOutcome:
        """Measure `module` on this site's held-out data (no training)."""
        raise NotImplementedError(f"{type(self).__name__} must define evaluate")

    # --- the TaskRunner contract -------------------------------------------------------------

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
        outcome = self.fit(self.module)
        return TrainOutcome(
            model=module_arrays(self.module, self.shared),
            metrics=outcome.metrics,
            data_size=outcome.data_size,
        )

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
