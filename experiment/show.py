"""What the ``experiment`` command prints for a person: the director's answers as lines and tables.

Plain functions from the wire's messages (or a metrics.jsonl row) to text; `foedus.experiment.cli`
makes the calls and prints what these give, or the JSON of the same message (`json_text`) for
``--json``. Names, reasons and descriptions are others' text: the command's output stream
strips their terminal controls (`foedus.command.text.printable_stream`), not these functions.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from foedus.command.table import table_lines
from foedus.history.rows import MetricsRow, RowError, StageRecord, TaskMetrics, metric_text
from foedus.privacy.site_budget import SiteBudget
from foedus.protos import director_pb2 as pb

STATES = {
    pb.EXPERIMENT_SUBMITTED: "submitted",
    pb.EXPERIMENT_APPROVED: "approved",
    pb.EXPERIMENT_REJECTED: "rejected",
    pb.EXPERIMENT_WAITING: "waiting",
    pb.EXPERIMENT_RUNNING: "running",
    pb.EXPERIMENT_COMPLETED: "completed",
    pb.EXPERIMENT_FAILED: "failed",
    pb.EXPERIMENT_CANCELLED: "cancelled",
}
FINAL = {
    pb.EXPERIMENT_REJECTED,
    pb.EXPERIMENT_COMPLETED,
    pb.EXPERIMENT_FAILED,
    pb.EXPERIMENT_CANCELLED,
}
SITE_STATES = {
    pb.COLLABORATOR_STATE_UNSPECIFIED: "-",
    pb.COLLABORATOR_APPROVAL_PENDING: "approval pending",
    pb.COLLABORATOR_SITE_APPROVED: "approved",
    pb.COLLABORATOR_SITE_REJECTED: "rejected",
    pb.COLLABORATOR_REFUSED: "refused",
    pb.COLLABORATOR_STARTED: "started",
    pb.COLLABORATOR_RUNNING: "running",
    pb.COLLABORATOR_EXITED: "exited",
    pb.COLLABORATOR_GAVE_UP: "gave up",
}
EXIT_CODED = {pb.COLLABORATOR_EXITED, pb.COLLABORATOR_GAVE_UP}  # states that show the exit code
STARTED = {pb.COLLABORATOR_STARTED, pb.COLLABORATOR_RUNNING, pb.COLLABORATOR_EXITED}


def submitted_line(e: pb.Experiment) -> str:
    """The new experiment's id and state, and the command that follows it."""
    return f"{e.experiment_id}  {STATES[e.state]}  (experiment status {e.experiment_id})"


def state_line(e: pb.Experiment) -> str:
    """An experiment's id and state, with the reason when it has one."""
    return f"{e.experiment_id}  {STATES[e.state]}" + (f": {e.reason}" if e.reason else "")


def experiments_table(experiments: Sequence[pb.Experiment]) -> list[str]:
    """`experiment list`: one row per experiment."""
    return table_lines(
        ("ID", "NAME", "OWNER", "STATE", "ROUNDS", "SUBMITTED"),
        [
            (
                e.experiment_id,
                e.name,
                e.owner,
                STATES[e.state] + (f" ({e.queue_position} in queue)" if e.queue_position else ""),
                f"{e.rounds_completed}/{e.rounds}",
                when(e.submitted_at),
            )
            for e in experiments
        ],
    )


def status_lines(e: pb.Experiment) -> list[str]:
    """`experiment status`: the experiment's fields, then a table of its sites."""
    models = (
        ", ".join(k for k, has in (("best", e.has_best_model), ("last", e.has_last_model)) if has)
        or "none yet"
    )
    fields = (
        ("id", e.experiment_id),
        ("name", e.name),
        ("owner", e.owner),
        ("state", STATES[e.state] + (f": {e.reason}" if e.reason else "")),
        ("rounds", f"{e.rounds_completed} of {e.rounds}"),
        ("submitted", when(e.submitted_at)),
        ("started", when(e.started_at)),
        ("ended", when(e.ended_at)),
        ("models", models),
        ("secure", "yes" if e.secure_aggregation else "no"),
        *_privacy_fields(e),
    )
    sites = table_lines(
        ("SITE", "ONLINE", "COLLABORATOR", "DETAIL"),
        [
            (
                s.site,
                "yes" if s.online else "no",
                SITE_STATES[s.state] + (f" ({s.exit_code})" if s.state in EXIT_CODED else ""),
                s.reason,
            )
            for s in e.sites
        ],
    )
    return [f"{label + ':':11}{value}" for label, value in fields] + sites + _budget_lines(e)


def _budget_lines(e: pb.Experiment) -> list[str]:
    """Each site's own DP-SGD budget, a line each ("alice: epsilon 2.10 of 8 at delta 1e-05, as
    of round 3"); none when no site reports one."""
    lines = []
    for s in e.sites:
        if s.HasField("budget"):
            cap = s.budget.max_epsilon if s.budget.HasField("max_epsilon") else None
            budget = SiteBudget(s.budget.epsilon, s.budget.delta, cap)
            lines.append(f"  {s.site}: {budget.text()}, as of round {s.budget.round}")
    return ["sites' own privacy budgets (DP-SGD):", *lines] if lines else []


def _privacy_fields(e: pb.Experiment) -> tuple[tuple[str, str], ...]:
    """A DP experiment's settings and its budget (the epsilon spent of the cap) as status
    fields; none without differential privacy."""
    if not e.HasField("differential_privacy"):
        return ()
    dp = e.differential_privacy
    capped = dp.HasField("max_epsilon")
    noun = "round" if e.rounds_completed == 1 else "rounds"
    return (
        ("privacy", f"DP-FedAvg, clip {dp.clip:g}, noise multiplier {dp.noise_multiplier:g}"),
        (
            "budget",
            f"epsilon {dp.epsilon:.2f}{f' of {dp.max_epsilon:g}' if capped else ''} at delta "
            f"{dp.delta:g} after {e.rounds_completed} {noun}{'' if capped else ' (no cap)'}",
        ),
    )


def progress_line(e: pb.Experiment) -> str:
    """`experiment wait`: the state, the rounds done and how many sites have started."""
    started = sum(1 for s in e.sites if s.state in STARTED)
    return (
        f"{STATES[e.state]}: round {e.rounds_completed} of {e.rounds}, "
        f"sites started {started}/{len(e.sites)}" + (f"; {e.reason}" if e.reason else "")
    )


def envoys_table(envoys: Sequence[pb.EnvoyInfo]) -> list[str]:
    """`experiment envoys`: one row per registered site."""
    return table_lines(
        ("SITE", "ONLINE", "LAST SEEN", "SAMPLES", "EXPERIMENTS", "SHARD"),
        [
            (
                v.name,
                "yes" if v.online else "no",
                when(v.last_seen),
                f"{samples(v.shard.train_samples)}/{samples(v.shard.valid_samples)}",
                str(len(v.experiments)),
                v.shard.description,
            )
            for v in envoys
        ],
    )


def row_lines(text: str, rounds: int, *, sites: bool) -> list[str]:
    """A metrics.jsonl row for a person (the row as it came when it is not one), and with
    `sites` one indented line per site."""
    try:
        row = MetricsRow.parse(text)
    except RowError:
        return [text]
    return [
        _metric_line(row, rounds) or text,
        *_secure_lines(row),
        *(_site_lines(row) if sites else []),
    ]


def _metric_line(row: MetricsRow, rounds: int) -> str | None:
    """Round r of `rounds`, sites reported, each task's metrics; None for a row of no round."""
    if row.final_validation:
        label = "final"
    elif row.round_number is None:
        return None
    else:
        label = f"round {row.round_number + 1}" + (f" of {rounds}" if rounds else "")
    if row.reporters is not None and row.missing is not None:
        reported = len(row.reporters)
        label += f", sites reported {reported}/{reported + len(row.missing)}"
    spent = [] if row.dp is None else [f"epsilon {row.dp['epsilon']:.2f}"]
    return "  ".join([label, *spent, *_task_parts(row.metrics)])


def _secure_lines(row: MetricsRow) -> list[str]:
    """A secure round's steps (each one's time, who dropped out in it), and why it closed
    untrained: indented lines; none for a plain round."""
    lines = []
    if row.secure:
        lines.append("  secure  " + "  ".join(map(stage_text, row.stages)))
    if row.untrained:
        lines.append(f"  untrained: {row.untrained}")
    return lines


def stage_text(stage: StageRecord) -> str:
    """One step of a secure round: `SHARES 0.21 s`, with `(dropped carol)` when some did."""
    seconds = "-" if stage.seconds is None else f"{stage.seconds:.2f} s"
    dropped = f" (dropped {', '.join(stage.dropped)})" if stage.dropped else ""
    return f"{stage.stage} {seconds}{dropped}"


def _site_lines(row: MetricsRow) -> list[str]:
    """A row's `sites`: one indented line per site with each task's metrics."""
    return [
        f"  {site}  " + "  ".join(_task_parts(tasks)) for site, tasks in sorted(row.sites.items())
    ]


def _task_parts(tasks: TaskMetrics) -> list[str]:
    """`task: metric value ...` for each task of a task -> metric -> value mapping."""
    parts = []
    for task, values in sorted(tasks.items()):
        shown = " ".join(
            f"{name} {metric_text(value)}"
            for name, value in sorted(values.items())
            if value is not None
        )
        parts.append(f"{task}: {shown}")
    return parts


def as_dict(message: Message) -> dict[str, Any]:
    """A message as JSON values, every field present (a script need not guess defaults)."""
    result: dict[str, Any] = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def json_text(message: Message, *, compact: bool = False) -> str:
    """A message as one JSON document: indented, or on one line (`compact`, for streams)."""
    return json.dumps(as_dict(message), indent=None if compact else 2)


def samples(count: int) -> str:
    """A count the site's envoy.yaml `shard` leaves out travels as 0: "-", not "no data"."""
    return str(count) if count else "-"


def when(seconds: float) -> str:
    """A moment in UTC for a person; "-" for none (0)."""
    if not seconds:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
