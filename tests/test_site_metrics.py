"""Each site's own metrics in metrics.jsonl, from a real federation whose aggregator is killed (-9)
and started again: a runner that reports known values, so every row is checked to the bit.

Real processes and certificates; the runner's folder goes on PYTHONPATH, as in test_offline.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np

from foedus.pki.layout import CertsLayout
from foedus.plans.runners import Array, Model, RunnerError, TrainOutcome, Validation
from foedus.plans.schema import AGGREGATED_MODEL_VALIDATION, TRAIN, RunnerSettings

from federation_processes import COLLABORATORS, FederationProcesses, write_plan

TESTS = Path(__file__).resolve().parent
ROUNDS = 3
TUNED = "locally_tuned_model_validation"
PATIENT = {"max_retries": 200, "max_wait_seconds": 60}  # collaborators outlast the restart
DEADLINE_SECONDS = 180  # a bound for a loaded machine; a quiet one needs seconds
KILLED = -signal.SIGKILL


class KnownMetricsRunner:
    """A one-weight model: site i (from 0) trains it to w + i + 1 and reports a loss of w + (i+1)/8;
    validation reports an accuracy of w/64 + (i+1)/16. Every value is exact in float32."""

    def __init__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> None:
        if settings.settings:
            key = next(iter(settings.settings))
            raise RunnerError(f"{settings.key_path(key)}: unknown key (this runner takes none)")
        self.step = collaborators.index(collaborator) + 1

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Array]:
        """w = 0."""
        return {"w": np.zeros(1, dtype=np.float32)}

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """w + step, with the loss the docstring of the class gives."""
        w = float(np.asarray(model["w"])[0])
        return TrainOutcome(
            model={"w": np.array([w + self.step], dtype=np.float32)},
            metrics={"loss": w + self.step / 8},
            data_size=10,
        )

    def validate(self, model: Model) -> Validation:
        """The accuracy the docstring of the class gives."""
        w = float(np.asarray(model["w"])[0])
        return Validation(metrics={"accuracy": w / 64 + self.step / 16}, data_size=10)


def expected_sites(round_number: int) -> dict[str, dict[str, dict[str, float]]]:
    """What each site reports in a round: the global w is 2r (the mean of w + 1, w + 2, w + 3)."""
    w = 2.0 * round_number
    sites: dict[str, dict[str, dict[str, float]]] = {}
    for index, name in enumerate(COLLABORATORS):
        step = index + 1
        validated = {AGGREGATED_MODEL_VALIDATION: {"accuracy": w / 64 + step / 16}}
        if round_number < ROUNDS:
            validated[TRAIN] = {"loss": w + step / 8}
            validated[TUNED] = {"accuracy": (w + step) / 64 + step / 16}
        sites[name] = dict(sorted(validated.items()))
    return sites


def test_each_sites_metrics_are_in_every_row_also_across_a_kill_and_restart(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """Killed -9 while saving round 1's model (its row not yet written) and started again, the
    aggregator writes every round's row once, each with every site's own metrics as it sent
    them, and the weighted means as before."""
    plan = write_plan(
        tmp_path,
        certs,
        ROUNDS,
        runner={"name": "test_site_metrics:KnownMetricsRunner", "settings": {}},
        connection=PATIENT,
    )
    environment = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    federation = FederationProcesses(plan, tmp_path)
    try:
        # Saves: round 0's last and best models, then round 1's last: the kill comes there.
        federation.start("aggregator", env={**environment, "FOEDUS_FAILPOINTS": "while_saving:3"})
        for name in COLLABORATORS:
            federation.start(name, env=environment)
        assert federation.wait("aggregator", DEADLINE_SECONDS) == KILLED
        lines = (tmp_path / "output" / "metrics.jsonl").read_text(encoding="utf-8")
        assert [json.loads(line)["round"] for line in lines.splitlines()] == [0]
        federation.start("aggregator", env=environment)
        codes = federation.wait_all(DEADLINE_SECONDS)
    finally:
        federation.stop_all()
    assert codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), federation.output()
    assert "failpoint while_saving reached: SIGKILL" in (tmp_path / "aggregator.log").read_text()
    rows = [
        json.loads(line)
        for line in (tmp_path / "output" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    for row in rows:
        number = row["round"]
        assert row["sites"] == expected_sites(number), number
        assert row["reporters"] == list(COLLABORATORS) and row["missing"] == []
        # The means beside them, unchanged: equal data sizes, so the plain mean of the sites.
        means = {
            task: {metric: sum(site[task][metric] for site in row["sites"].values()) / 3}
            for task, values in row["sites"]["alice"].items()
            for metric in values
        }
        assert row["metrics"] == means, number
