"""The plan's `compression` section: `none` both ways by default, a code's name or a mapping
read as written, topk's settings only with topk and only for uploads, every upload code refused
beside secure aggregation, and (until the wire carries them) every code but `none` refused at
start in one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from foedus.aggregator.cli import main
from foedus.compression.codes import LOSSY, Code
from foedus.plans import parse_plan
from foedus.plans.compression import compression, not_on_the_wire_yet
from foedus.plans.protections import secure_compression
from foedus.plans.reader import Section
from foedus.plans.schema import CodeSettings, CompressionSettings, SecureAggregationSettings

from servers import plan_document
from test_plans import OTHER_PROBLEM, PLAN_PATH, _document, _problems, _with


def read(section: object) -> tuple[CompressionSettings, list[str]]:
    """The `compression` section as its reader gives it, and the problems it found."""
    problems: list[str] = []
    settings = compression(Section(section, "compression", problems))
    return settings, problems


def test_the_codes_say_once_what_each_is() -> None:
    """Three codes lose values, two do not; only topk is unfit for a download."""
    assert {code for code in Code if code.lossy} == LOSSY == {Code.BFLOAT16, Code.INT8, Code.TOPK}
    assert [code for code in Code if not code.for_download] == [Code.TOPK]
    assert [code.value for code in Code] == ["none", "lossless", "bfloat16", "int8", "topk"]


def test_compression_is_none_both_ways_by_default() -> None:
    """Without the section, empty, or with null directions: none up and down."""
    assert parse_plan(_document(), PLAN_PATH).compression == CompressionSettings()
    assert CompressionSettings().upload == CodeSettings(Code.NONE, None, "float32")
    for section in (None, {}, {"upload": None, "download": None}, {"upload": "none"}):
        plan = parse_plan(_with(_document(), ("compression", section)), PLAN_PATH)
        assert plan.compression == CompressionSettings()


@pytest.mark.parametrize("code", [code for code in Code if code is not Code.TOPK])
def test_a_code_s_name_is_read_both_ways(code: Code) -> None:
    """Every code but topk by its name, up or down, and the same as a mapping with `code`."""
    settings, problems = read({"upload": code.value, "download": {"code": code.value}})
    assert problems == []
    assert settings == CompressionSettings(upload=CodeSettings(code), download=CodeSettings(code))


def test_topk_with_its_settings_as_written() -> None:
    """topk's fraction (integers too) and values as written; values float32 by default."""
    settings, problems = read({"upload": {"code": "topk", "fraction": 0.01, "values": "int8"}})
    assert problems == []
    assert settings.upload == CodeSettings(Code.TOPK, 0.01, "int8")
    assert settings.download == CodeSettings()
    settings, problems = read({"upload": {"code": "topk", "fraction": 0.5}})
    assert problems == [] and settings.upload == CodeSettings(Code.TOPK, 0.5, "float32")


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        (
            {"download": "topk"},
            "compression.download: topk is for uploads only (a download sends the whole model)",
        ),
        (
            {"download": {"code": "topk", "fraction": 0.01}},
            "compression.download: topk is for uploads only (a download sends the whole model)",
        ),
        (
            {"upload": "topk"},
            "compression.upload: topk needs its fraction, the share of an update's values it "
            "keeps: write {code: topk, fraction: 0.01}",
        ),
        (
            {"upload": {"code": "topk"}},
            "compression.upload.fraction: required with topk: the share of an update's values "
            "it keeps (0.01: the largest 1%)",
        ),
        (
            {"upload": {"code": "topk", "fraction": 0.6}},
            "compression.upload.fraction: expected a number above 0 and at most 0.5 (the share "
            "of an update's values topk keeps), got 0.6",
        ),
        (
            {"upload": {"code": "topk", "fraction": 0}},
            "compression.upload.fraction: expected a number above 0 and at most 0.5 (the share "
            "of an update's values topk keeps), got 0",
        ),
        (
            {"upload": {"code": "topk", "fraction": 10**400}},
            "compression.upload.fraction: expected a number above 0",
        ),
        (
            {"upload": {"code": "topk", "fraction": 0.01, "values": "int4"}},
            "compression.upload.values: expected one of float32, int8, got 'int4'",
        ),
        (
            {"upload": {"code": "int8", "fraction": 0.01}},
            "compression.upload.fraction: only for topk, not int8; leave it out",
        ),
        (
            {"download": {"code": "lossless", "values": "int8"}},
            "compression.download.values: only for topk, not lossless; leave it out",
        ),
        ({"upload": {"fraction": 0.01}}, "compression.upload.code: required, but missing"),
        (
            {"upload": "zip"},
            "compression.upload: expected one of none, lossless, bfloat16, int8, topk, or a "
            "mapping with code (and topk's fraction and values), got 'zip'",
        ),
        ({"upload": "INT8"}, "compression.upload: expected one of none, lossless"),
        ({"upload": True}, "compression.upload: expected one of none, lossless"),
        (
            {"upload": {"code": "gzip"}},
            "compression.upload.code: expected one of none, lossless, bfloat16, int8, topk, "
            "got 'gzip'",
        ),
        (
            {"upload": {"code": "topk", "fraction": 0.1, "k": 5}},
            "compression.upload.k: unknown key",
        ),
        ({"uplaod": "int8"}, "compression.uplaod: unknown key"),
        ("int8", "compression: expected a mapping, got str"),
    ],
)
def test_a_bad_compression_section_is_one_line_naming_the_key(
    section: object, problem: str
) -> None:
    """Each mistake is one line naming its key, collected with the plan's other problems."""
    document = _with(_document(), ("compression", section), OTHER_PROBLEM[:2])
    problems = _problems(document)
    assert len(problems) == 2, problems
    assert problems[0].startswith(OTHER_PROBLEM[2])
    assert problems[1].startswith(problem), problems


@pytest.mark.parametrize("code", [code for code in Code if code is not Code.NONE])
def test_secure_aggregation_refuses_every_upload_code(code: Code) -> None:
    """Masked values do not compress and a lossy code breaks the masks: every upload code but
    none is refused beside secure aggregation, saying so and what to use instead."""
    document = _with(
        _document(),
        ("secure_aggregation.enabled", True),
        (
            "compression.upload",
            {"code": code.value, "fraction": 0.01} if code is Code.TOPK else code.value,
        ),
    )
    assert _problems(document) == [
        f"compression.upload: {code} with secure_aggregation.enabled: masked values are uniform "
        "in the ring and do not compress, and a lossy code would break the masks; leave it none "
        "(secure_aggregation.bits is secure aggregation's own quantize-then-mask: 16 bits "
        "halves the upload)"
    ]


@pytest.mark.parametrize("code", [code for code in Code if code.for_download])
def test_secure_aggregation_lets_a_download_use_any_code_fit_for_one(code: Code) -> None:
    """The download is the unmasked model: `secure_compression` leaves its code alone (a lossy
    one is refused by `lossy_download`, test_download_codes.py), as it leaves every code alone
    when it is off; differential privacy allows every upload code."""
    secure = SecureAggregationSettings(enabled=True)
    assert secure_compression(CompressionSettings(download=CodeSettings(code)), secure) == []
    for upload in Code:
        chosen = CompressionSettings(upload=CodeSettings(upload))
        assert secure_compression(chosen, SecureAggregationSettings()) == []
    private = _with(
        _document(),
        ("differential_privacy.enabled", True),
        ("differential_privacy.clip", 1.0),
        ("differential_privacy.noise_multiplier", 1.0),
        ("compression.upload", "int8"),
    )
    assert _problems(private) == [
        "compression.upload: int8 is not carried on the wire yet (issue #24, in progress)"
    ]


def test_every_code_but_none_is_refused_until_the_wire_carries_it() -> None:
    """A plan that chooses a code in either direction is refused, one line a direction, and
    only once its section is otherwise right (its own problems say what to change first)."""
    document = _with(
        _document(),
        ("compression.upload", {"code": "topk", "fraction": 0.01, "values": "int8"}),
        ("compression.download", "lossless"),
    )
    assert _problems(document) == [
        "compression.upload: topk is not carried on the wire yet (issue #24, in progress)",
        "compression.download: lossless is not carried on the wire yet (issue #24, in progress)",
    ]
    assert _problems(_with(_document(), ("compression.download", "topk"))) == [
        "compression.download: topk is for uploads only (a download sends the whole model)"
    ]
    assert not_on_the_wire_yet(CompressionSettings()) == []


def test_aggregator_start_stops_on_a_compression_it_cannot_carry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aggregator start` on a plan with a code: exit 2, one line naming the file and the key,
    nothing started."""
    document: dict[str, Any] = plan_document(
        None,
        aggregator={"output_dir": str(tmp_path / "out")},
        compression={"upload": "int8"},
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(document), encoding="utf-8")
    code = main(["start", "--plan", str(plan)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"{plan}: compression.upload: int8 is not carried on the wire yet (issue #24, in progress)"
    ]
    assert not (tmp_path / "out").exists()
