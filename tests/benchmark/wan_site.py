"""One site of the wide-area round: the real collaborator loop in a process of its own.

Usage: ``python wan_site.py --plan PLAN --name NAME --address HOST --port PORT --state-dir
DIR``, run inside the site's network namespace, with the plan's runner (the no-op runner, or
the real model's `wan_torch.py` under `.venv-torch`'s interpreter) and its upload code (as
`collaborator start` codes it, the residuals of a lossy code in DIR). It imports and builds
everything (the runner's data and module too), prints ``ready``, waits for a line on stdin (the
start, so no site's start-up is timed), runs the loop until the aggregator says quit, and
prints ``marks JSON``: for each round, when its download and upload began and ended
(`time.perf_counter`, the same clock as the benchmark's on Linux).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foedus.collaborator.client import AggregatorGRPCClient, OutgoingTensor
from foedus.collaborator.compressed import UploadEncoder, residual_store
from foedus.collaborator.loop import run_collaborator
from foedus.compression.codes import Code
from foedus.plans import load_plan
from foedus.plans.runners import load_runner
from foedus.plans.schema import CodeSettings


class MarkingClient(AggregatorGRPCClient):
    """The real client, noting when each round's download and upload begin and end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marks: dict[int, dict[str, float]] = {}

    def get_aggregated_model(self, names: Sequence[str], round_number: int) -> Any:
        """As the client's; the first download start and the last end of the round noted."""
        marks = self.marks.setdefault(round_number, {})
        marks.setdefault("download_start", time.perf_counter())
        try:
            return super().get_aggregated_model(names, round_number)
        finally:
            marks["download_end"] = time.perf_counter()

    def send_local_task_results(
        self, round_number: int, task_name: str, data_size: int, tensors: Sequence[OutgoingTensor]
    ) -> None:
        """As the client's; its start and end noted."""
        marks = self.marks.setdefault(round_number, {})
        marks["upload_start"] = time.perf_counter()
        super().send_local_task_results(round_number, task_name, data_size, tensors)
        marks["upload_end"] = time.perf_counter()


def _upload_encoder(settings: CodeSettings, state: Path) -> UploadEncoder | None:
    """What codes the site's updates in the plan's `compression.upload` code, as `collaborator
    start` makes it (None: `none`), its residuals in `state`/residuals for a lossy code."""
    if settings.code is Code.NONE:
        return None
    return UploadEncoder(settings, residual_store(state, settings))


def main(argv: Sequence[str] | None = None) -> int:
    """Wait for the start on stdin, run the collaborator to quit, print the marks; 1 if not quit."""
    parser = argparse.ArgumentParser(prog="wan_site.py", description=__doc__)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", required=True, help="the aggregator's address from here")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="the site's state folder: its residuals under a lossy upload code",
    )
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    upload = _upload_encoder(plan.compression.upload, args.state_dir)
    client = MarkingClient.from_plan(
        plan, args.name, aggregator_address=args.address, aggregator_port=args.port
    )
    factory = load_runner(plan.runner)
    runner = factory(plan.runner, collaborator=args.name, collaborators=plan.collaborators)
    factory.initial_model(plan.runner)  # the no-op runner's: built before the start, and kept
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        report = run_collaborator(client, runner, plan.runner, upload=upload)
    finally:
        client.disconnect()
    print(f"marks {json.dumps(client.marks)}", flush=True)
    return 0 if report.quit else 1


if __name__ == "__main__":
    sys.exit(main())
