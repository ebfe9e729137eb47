"""The plan's `compression` section: the code that carries the sites' updates (`upload`) and the
global model (`download`), `none` both ways by default.

Each direction is a code's name (`upload: int8`) or a mapping (`upload: {code: topk, fraction:
0.01, values: int8}`); `fraction` and `values` belong to `topk`, which only uploads may use (a
download sends the whole model). What a code cannot do beside the plan's protections is refused
with them (`foedus.plans.protections.secure_compression`, `lossy_download`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from foedus.compression.codes import TOPK_MAX_FRACTION, TOPK_VALUES, Code
from foedus.plans.reader import Section
from foedus.plans.schema import CodeSettings, CompressionSettings

_NAMES = ", ".join(code.value for code in Code)


def compression(section: Section) -> CompressionSettings:
    """`compression`, each direction checked; absent or null, a direction is `none`."""
    settings = CompressionSettings(
        upload=_direction(section, "upload"), download=_direction(section, "download")
    )
    section.finish()
    return settings


def _direction(parent: Section, key: str) -> CodeSettings:
    """One direction: a code's name, or a mapping with `code` (and topk's `fraction`, `values`)."""
    value = parent.data.get(key)
    if value is None:
        parent.seen.add(key)
        return CodeSettings()
    if isinstance(value, Mapping):
        settings = _mapping(parent.section(key), upload=key == "upload")
    else:
        want = f"one of {_NAMES}, or a mapping with code (and topk's fraction and values)"
        code = parent.checked(key, Code.NONE, _code, want)
        if code is Code.TOPK and key == "upload":
            parent.problems.append(
                f"{parent.key(key)}: topk needs its fraction, the share of an update's values "
                "it keeps: write {code: topk, fraction: 0.01}"
            )
        settings = CodeSettings(code=code)
    if key == "download" and not settings.code.for_download:
        parent.problems.append(
            f"{parent.key(key)}: {settings.code} is for uploads only (a download sends the "
            "whole model)"
        )
    return settings


def _mapping(section: Section, *, upload: bool) -> CodeSettings:
    """`{code: ..., fraction: ..., values: ...}`; `fraction` required with topk, and only there."""
    if "code" not in section.data:
        section.problems.append(f"{section.key('code')}: required, but missing")
    code = section.checked("code", Code.NONE, _code, f"one of {_NAMES}")
    fraction = section.checked(
        "fraction",
        None,
        _fraction,
        f"a number above 0 and at most {TOPK_MAX_FRACTION:g} (the share of an update's values "
        "topk keeps)",
    )
    values = section.choice("values", CodeSettings().values, TOPK_VALUES)
    section.finish()
    if code is Code.TOPK:
        if "fraction" not in section.data and upload:  # a download's topk: refused as such
            section.problems.append(
                f"{section.key('fraction')}: required with topk: the share of an update's "
                "values it keeps (0.01: the largest 1%)"
            )
        return CodeSettings(code=code, fraction=fraction, values=values)
    for key in ("fraction", "values"):
        if key in section.data and "code" in section.data:
            section.problems.append(f"{section.key(key)}: only for topk, not {code}; leave it out")
    return CodeSettings(code=code)


def _code(value: object) -> Code | None:
    """A code's name as the plan writes it (lower case), or None."""
    try:
        return Code(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _fraction(value: object) -> float | None:
    """A YAML number in (0, TOPK_MAX_FRACTION], or None (an integer past float's range too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and 0 < number <= TOPK_MAX_FRACTION else None
