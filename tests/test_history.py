"""foedus.history.rows: metrics.jsonl's one writer and one reader, and the rows older aggregators wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from foedus.history.rows import (
    MetricsRow,
    RowError,
    StageRecord,
    append_row,
    read_lines,
    read_rows,
)


def full_row() -> MetricsRow:
    """A row as the aggregator writes one, with a metric that is not finite."""
    return MetricsRow(
        round_number=2,
        metrics={"train": {"loss": 0.5}, "aggregated_model_validation": {"accuracy": math.nan}},
        federation="f-uuid",
        run="2026-01-01T00:00:00+00:00",
        reporters=("alice", "bob"),
        missing=("carol",),
        seconds=1.25,
        sites={"alice": {"train": {"loss": 0.25}}},
        secure=True,
        stages=(StageRecord("KEYS", 0.5), StageRecord("SHARES", None, ("carol",))),
        untrained="round 2 has 1 survivor(s) (alice), fewer than the threshold of 2",
    )


def test_a_row_is_one_strict_json_line_with_sorted_keys(tmp_path: Path) -> None:
    """The line a row is written as, key for key: NaN as null; read back, the same row."""
    path = tmp_path / "metrics.jsonl"
    append_row(path, full_row())
    assert path.read_text(encoding="utf-8") == (
        '{"federation": "f-uuid", "final_validation": false, "metrics": '
        '{"aggregated_model_validation": {"accuracy": null}, "train": {"loss": 0.5}}, '
        '"missing": ["carol"], "reporters": ["alice", "bob"], "round": 2, '
        '"run": "2026-01-01T00:00:00+00:00", "seconds": 1.25, "secure": true, '
        '"sites": {"alice": {"train": {"loss": 0.25}}}, '
        '"stages": [{"dropped": [], "seconds": 0.5, "stage": "KEYS"}, '
        '{"dropped": ["carol"], "seconds": null, "stage": "SHARES"}], '
        '"untrained": "round 2 has 1 survivor(s) (alice), fewer than the threshold of 2"}\n'
    )
    (row,) = read_rows(path)
    assert row.metrics["aggregated_model_validation"] == {"accuracy": None}
    assert row == MetricsRow.parse(full_row().to_json())
    assert (row.reporters, row.missing, row.sites) == (
        ("alice", "bob"),
        ("carol",),
        {"alice": {"train": {"loss": 0.25}}},
    )
    assert row.secure and row.stages == full_row().stages
    assert row.untrained == full_row().untrained


def test_an_older_row_gets_the_empty_value_of_what_it_lacks() -> None:
    """A row written before `sites`, `run`, the lists and secure aggregation's steps were kept:
    empty, or None for the lists; a plain round."""
    row = MetricsRow.parse(json.dumps({"round": 0, "metrics": {"train": {"loss": 1}}}))
    assert row == MetricsRow(0, {"train": {"loss": 1.0}})
    assert (row.sites, row.run, row.reporters, row.missing) == ({}, "", None, None)
    assert (row.secure, row.stages, row.untrained) == (False, (), "")


def test_the_parts_of_a_row_that_are_not_what_is_written_are_left_out() -> None:
    """A task that is not a mapping, a value not a number (a bool neither), a round not whole,
    a step without its name."""
    row = MetricsRow.parse(
        json.dumps(
            {
                "round": "3",
                "metrics": {"train": {"loss": "low", "flag": True, "acc": 0.5}, "bad": [1]},
                "sites": {"alice": 7, "bob": {"train": {"loss": None}}},
                "reporters": "alice",
                "secure": "yes",
                "stages": [
                    "KEYS",
                    {"seconds": 1},
                    {"stage": "SHARES", "seconds": "1", "dropped": "bob"},
                    {"stage": "UNMASK", "seconds": 2, "dropped": ["carol"]},
                ],
                "untrained": 3,
            }
        )
    )
    assert row.round_number is None
    assert row.metrics == {"train": {"acc": 0.5}}
    assert row.sites == {"alice": {}, "bob": {"train": {"loss": None}}}
    assert row.reporters is None
    assert not row.secure and row.untrained == ""
    assert row.stages == (StageRecord("SHARES", None), StageRecord("UNMASK", 2.0, ("carol",)))


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '"text"', ""])
def test_a_line_that_is_not_a_json_object_is_not_a_row(line: str) -> None:
    """`RowError`, which readers skip."""
    with pytest.raises(RowError):
        MetricsRow.parse(line)


def test_a_last_line_being_written_is_not_read_and_only_the_writer_removes_it(
    tmp_path: Path,
) -> None:
    """Without its newline a line is not read; `repair` (the writer's) cuts it from the file."""
    path = tmp_path / "metrics.jsonl"
    assert read_lines(path) == [] and read_rows(path) == []
    append_row(path, MetricsRow(0))
    with path.open("a", encoding="utf-8") as file:
        file.write('{"round": 1, "metr')
    assert read_lines(path) == [MetricsRow(0).to_json()]
    assert path.read_text(encoding="utf-8").endswith('"metr')  # a reader leaves the file alone
    assert [row.round_number for row in read_rows(path, repair=True)] == [0]
    assert path.read_text(encoding="utf-8") == MetricsRow(0).to_json() + "\n"


def test_a_line_that_is_not_a_row_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The rows around it are read; the warning names the file and the line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\nnot json\n[1]\n{"round": 1}\n', encoding="utf-8")
    assert [row.round_number for row in read_rows(path)] == [0, 1]
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: line 2 is not JSON; left as it is",
        f"{path}: line 3 is not a JSON object; left as it is",
    ]
