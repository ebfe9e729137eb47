"""The built-in digits runner: seeded model, disjoint shards, settings errors, FedAvg to over 90%."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from foedus.collaborator.digits import (
    BIAS,
    SHAPES,
    WEIGHT,
    DigitsRunner,
    DigitsSettings,
    load_data,
    make_shards,
)
from foedus.plans import load_plan
from foedus.plans.runners import Array, RunnerError, TaskRunner, load_runner
from foedus.plans.schema import RunnerSettings

REPO = Path(__file__).resolve().parent.parent
NAMES = ("alice", "bob", "carol")
SAMPLES = 1797
# The plan settings the acceptance figure is about (plans/local.yaml's).
FEDAVG_SETTINGS = {
    "split": "iid",
    "test_fraction": 0.2,
    "epochs": 1,
    "batch_size": 32,
    "learning_rate": 0.5,
}


def runner_settings(seed: int = 0, **settings: object) -> RunnerSettings:
    """Runner settings as the plan loader makes them (a read-only mapping)."""
    return RunnerSettings(name="digits", seed=seed, settings=MappingProxyType(dict(settings)))


def read_only(model: Mapping[str, Array]) -> dict[str, Array]:
    """Copies that cannot be written to, like the arrays the client decodes from the wire."""
    copies = {name: np.array(array) for name, array in model.items()}
    for array in copies.values():
        array.flags.writeable = False
    return copies


def test_digits_is_the_builtin_runner_and_a_task_runner() -> None:
    """`runner.name: digits` resolves to DigitsRunner, and its instances satisfy TaskRunner."""
    settings = runner_settings()
    assert load_runner(settings) is DigitsRunner
    assert isinstance(DigitsRunner(settings, collaborator="bob", collaborators=NAMES), TaskRunner)


def test_the_example_plans_runner_settings_are_accepted() -> None:
    """plans/local.yaml's runner settings are the acceptance figure's, and the runner takes them."""
    plan = load_plan(REPO / "plans" / "local.yaml")
    assert dict(plan.runner.settings) == FEDAVG_SETTINGS
    runner = DigitsRunner(plan.runner, collaborator="carol", collaborators=plan.collaborators)
    assert runner.settings == DigitsSettings.parse(FEDAVG_SETTINGS) == DigitsSettings()


def test_initial_model_is_seeded() -> None:
    """The same seed gives a bit-identical float32 model; another seed gives other weights."""
    first = DigitsRunner.initial_model(runner_settings(seed=7))
    again = DigitsRunner.initial_model(runner_settings(seed=7, epochs=3))
    other = DigitsRunner.initial_model(runner_settings(seed=8))
    assert {name: array.shape for name, array in first.items()} == dict(SHAPES)
    assert all(array.dtype == np.float32 for array in first.values())
    assert all(first[name].tobytes() == again[name].tobytes() for name in SHAPES)
    assert first[WEIGHT].tobytes() != other[WEIGHT].tobytes()
    assert 0 < float(np.abs(first[WEIGHT]).max()) < 0.1  # small random weights


def test_data_is_not_loaded_at_import_nor_for_the_initial_model() -> None:
    """Importing the runner and making the initial model (the aggregator's use) never loads scikit-learn."""
    script = (
        "import sys\n"
        "from foedus.collaborator.digits import DigitsRunner\n"
        "from foedus.plans.schema import RunnerSettings\n"
        "DigitsRunner.initial_model(RunnerSettings(name='digits', seed=0, settings={}))\n"
        "assert 'sklearn' not in sys.modules, 'scikit-learn was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize("split", ["iid", "label_skew"])
def test_shards_are_disjoint_and_cover_the_splits(split: str) -> None:
    """The collaborators' train shards partition the train split, their test shards the test split."""
    _, labels = load_data()
    settings = DigitsSettings(split=split, test_fraction=0.25)
    shards = make_shards(labels, settings, seed=3, count=len(NAMES))
    trains = [shard.train for shard in shards]
    tests = [shard.test for shard in shards]
    all_train, all_test = np.concatenate(trains), np.concatenate(tests)
    assert len(set(all_train.tolist())) == len(all_train)  # no row in two train shards
    assert len(set(all_test.tolist())) == len(all_test)  # no row in two test shards
    assert not set(all_train.tolist()) & set(all_test.tolist())
    assert sorted([*all_train.tolist(), *all_test.tolist()]) == list(range(SAMPLES))
    assert len(all_test) == round(0.25 * SAMPLES)
    assert max(map(len, trains)) - min(map(len, trains)) <= 1
    assert max(map(len, tests)) - min(map(len, tests)) <= 1
    # Each runner holds the shard of its index in the plan's list, and reports its sizes.
    model = DigitsRunner.initial_model(runner_settings(seed=3))
    for name, shard in zip(NAMES, shards, strict=True):
        runner = DigitsRunner(
            runner_settings(seed=3, split=split, test_fraction=0.25),
            collaborator=name,
            collaborators=NAMES,
        )
        assert np.array_equal(runner.shard.train, shard.train)
        assert np.array_equal(runner.shard.test, shard.test)
        assert runner.validate(model).data_size == len(shard.test)


def test_features_are_scaled_to_unit_range() -> None:
    """The 0-16 pixel values become features in [0, 1], one row of 64 per image."""
    features, labels = load_data()
    assert features.shape == (SAMPLES, 64) and labels.shape == (SAMPLES,)
    assert features.min() == 0.0 and features.max() == 1.0


def test_label_skew_gives_each_collaborator_mostly_a_few_labels() -> None:
    """With label_skew four labels make most of each train shard, yet every label occurs; iid is even."""
    _, labels = load_data()

    def label_counts(split: str, skew: float = 0.8) -> list[np.ndarray]:
        settings = DigitsSettings(split=split, skew=skew)
        shards = make_shards(labels, settings, seed=0, count=len(NAMES))
        return [np.sort(np.bincount(labels[shard.train], minlength=10)) for shard in shards]

    def top_four_shares(counts: list[np.ndarray]) -> list[float]:
        return [float(count[-4:].sum() / count.sum()) for count in counts]

    skewed = label_counts("label_skew")
    assert all(share > 0.75 for share in top_four_shares(skewed))
    assert all((count > 0).all() for count in skewed)  # the shuffled-back part brings every label
    assert all((count > 0).sum() <= 5 for count in label_counts("label_skew", skew=1.0))
    assert all(share < 0.5 for share in top_four_shares(label_counts("iid")))


def test_settings_errors_name_every_bad_key_at_once() -> None:
    """Bad values, a stray skew and an unknown key are all reported, each as runner.settings.<key>."""
    settings = runner_settings(
        split="by_colour",
        test_fraction=1.0,
        epochs=True,
        batch_size=0,
        learning_rate=-0.1,
        skew=0.5,
        momentum=0.9,
    )
    with pytest.raises(RunnerError) as raised:
        DigitsRunner(settings, collaborator="alice", collaborators=NAMES)
    problems = str(raised.value).split("; ")
    assert [problem.split(":")[0] for problem in problems] == [
        "runner.settings.split",
        "runner.settings.test_fraction",
        "runner.settings.epochs",
        "runner.settings.batch_size",
        "runner.settings.learning_rate",
        "runner.settings.skew",
        "runner.settings.momentum",
    ]
    assert "got 'by_colour'" in problems[0]
    assert "only used with split: label_skew" in problems[5]
    assert "unknown key" in problems[6]


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"split": "label_skew", "skew": 1.5}, "runner.settings.skew: expected a number 0-1"),
        ({"learning_rate": float("nan")}, "runner.settings.learning_rate: expected a number > 0"),
        ({"epochs": 2.0}, "runner.settings.epochs: expected an integer >= 1"),
        ({"test_fraction": 0.0001}, "runner.settings.test_fraction: 0.0001 leaves 0 test samples"),
    ],
)
def test_a_single_bad_setting_is_refused(settings: dict[str, object], key: str) -> None:
    """Each out-of-range or ill-typed setting is refused with its key and the problem."""
    with pytest.raises(RunnerError, match=f"^{key}"):
        DigitsRunner(runner_settings(**settings), collaborator="alice", collaborators=NAMES)


def test_train_returns_float32_model_and_leaves_its_input_alone() -> None:
    """`train` returns float32 tensors of the same names and shapes, and never writes to its input."""
    runner = DigitsRunner(runner_settings(), collaborator="carol", collaborators=NAMES)
    initial = DigitsRunner.initial_model(runner_settings())
    given = read_only(initial)  # writing to these would raise
    outcome = runner.train(given, 0)
    assert {name: (a.dtype, a.shape) for name, a in outcome.model.items()} == {
        name: (np.dtype(np.float32), shape) for name, shape in SHAPES.items()
    }
    assert outcome.data_size == len(runner.shard.train)
    assert set(outcome.metrics) == {"loss"} and 0 < outcome.metrics["loss"] < np.log(10)
    assert not np.array_equal(outcome.model[WEIGHT], initial[WEIGHT])
    assert all(given[name].tobytes() == initial[name].tobytes() for name in SHAPES)
    trained = runner.validate(outcome.model)
    assert trained.metrics["accuracy"] > runner.validate(initial).metrics["accuracy"]


def test_a_round_trains_alike_whatever_this_process_ran_before() -> None:
    """Round 2 from the same model gives the same bits on a fresh runner as after rounds 0 and 1
    (a restarted collaborator trains as it would have); another round shuffles otherwise."""
    settings = runner_settings(epochs=2)
    model = read_only(DigitsRunner.initial_model(settings))
    worked = DigitsRunner(settings, collaborator="bob", collaborators=NAMES)
    for round_number in (0, 1):
        worked.train(model, round_number)
    after_work = worked.train(model, 2).model
    fresh = DigitsRunner(settings, collaborator="bob", collaborators=NAMES).train(model, 2).model
    assert all(after_work[name].tobytes() == fresh[name].tobytes() for name in SHAPES)
    other = worked.train(model, 3).model
    assert other[WEIGHT].tobytes() != fresh[WEIGHT].tobytes()


def test_a_model_of_another_shape_is_refused() -> None:
    """A model with a missing tensor or a wrong shape is refused with a RunnerError naming it."""
    runner = DigitsRunner(runner_settings(), collaborator="alice", collaborators=NAMES)
    model = DigitsRunner.initial_model(runner_settings())
    with pytest.raises(RunnerError, match="expected tensors softmax/bias, softmax/weight"):
        runner.validate({WEIGHT: model[WEIGHT]})
    with pytest.raises(RunnerError, match=r"softmax/bias has shape \(11,\)"):
        runner.train({**model, BIAS: np.zeros(11, dtype=np.float32)}, 0)


def simulate_fedavg(rounds: int) -> tuple[dict[str, Array], list[float]]:
    """FedAvg in process: three collaborators train, the models are averaged by data size."""
    settings = runner_settings(seed=0, **FEDAVG_SETTINGS)
    runners = [DigitsRunner(settings, collaborator=name, collaborators=NAMES) for name in NAMES]
    model = DigitsRunner.initial_model(settings)
    accuracies = []
    for round_number in range(rounds):
        outcomes = [runner.train(read_only(model), round_number) for runner in runners]
        total = sum(outcome.data_size for outcome in outcomes)
        model = {
            name: (
                sum(
                    outcome.model[name].astype(np.float64) * outcome.data_size
                    for outcome in outcomes
                )
                / total
            ).astype(np.float32)
            for name in model
        }
        validations = [runner.validate(model) for runner in runners]
        held_out = sum(validation.data_size for validation in validations)
        accuracies.append(sum(v.metrics["accuracy"] * v.data_size for v in validations) / held_out)
    return model, accuracies


def test_fedavg_of_three_collaborators_passes_90_percent_reproducibly() -> None:
    """Ten FedAvg rounds (iid, 1 epoch, batch 32, lr 0.5) exceed 90% accuracy, bit for bit alike twice."""
    model, accuracies = simulate_fedavg(10)
    again, accuracies_again = simulate_fedavg(10)
    assert accuracies[-1] > 0.90, accuracies
    assert accuracies == accuracies_again
    assert all(model[name].tobytes() == again[name].tobytes() for name in model)
    # The weighted mean of the shards' accuracies is the accuracy on the whole held-out split.
    features, labels = load_data()
    shards = make_shards(labels, DigitsSettings.parse(FEDAVG_SETTINGS), seed=0, count=len(NAMES))
    test_rows = np.concatenate([shard.test for shard in shards])
    logits = features[test_rows] @ model[WEIGHT].astype(np.float64) + model[BIAS]
    whole = float(np.mean(np.argmax(logits, axis=1) == labels[test_rows]))
    assert accuracies[-1] == pytest.approx(whole, abs=1e-12)
