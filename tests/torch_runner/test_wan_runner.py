"""The wide-area benchmark's real model (`tests/benchmark/wan_torch.py`): its sites train on the
first `train_images` of their shard, and a bad `width` or `train_images` names its key."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from foedus.plans.runners import RunnerError
from foedus.plans.schema import RunnerSettings

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmark"
NAMES = ("col000", "col001", "col002", "col003")
WIDTH = 8


@pytest.fixture
def wan_torch(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`wan_torch`, imported as the benchmark's sites import it (by name, from its folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARK))
    return importlib.import_module("wan_torch")


def settings(**more: object) -> RunnerSettings:
    """The benchmark's runner section, small, with `more` keys."""
    raw = {"width": WIDTH, "epochs": 1, "batch_size": 32, "learning_rate": 0.05, **more}
    return RunnerSettings("wan_torch:WideDigitsRunner", 0, raw)


def test_a_site_trains_on_the_first_train_images_of_its_shard(wan_torch: ModuleType) -> None:
    """`train_images: 64` keeps the shard's first 64 images (2 batches of 32): the update is an
    SGD update of those, counted as 64 records; 0 keeps the whole shard."""
    cls = wan_torch.WideDigitsRunner
    whole = cls(settings(train_images=0), collaborator=NAMES[1], collaborators=NAMES)
    cut = cls(settings(train_images=64), collaborator=NAMES[1], collaborators=NAMES)
    assert len(whole.train_y) > 300
    assert len(cut.train_y) == 64
    assert (cut.train_x == whole.train_x[:64]).all()
    model = cls.initial_model(settings(train_images=64))
    outcome = cut.train(model, 1)
    assert outcome.data_size == 64
    moved = [name for name in model if not np.array_equal(outcome.model[name], model[name])]
    assert sorted(moved) == sorted(model)  # every weight and bias took the SGD steps


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train_images", -1, "runner.settings.train_images: expected an integer >= 0"),
        ("train_images", True, "runner.settings.train_images: expected an integer >= 0"),
        ("width", 0, "runner.settings.width: expected an integer 1-65536, got 0"),
    ],
)
def test_a_bad_setting_is_refused_by_its_key(
    wan_torch: ModuleType, key: str, value: object, message: str
) -> None:
    """Each of the runner's own keys is checked before anything is built."""
    raw = {**settings().settings, key: value}
    with pytest.raises(RunnerError, match=message):
        wan_torch.WideDigitsRunner.check_settings(
            RunnerSettings("wan_torch:WideDigitsRunner", 0, raw)
        )
