"""Others' text on a terminal: `foedus.command.text.printable`, the log lines and error lines of commands."""

from __future__ import annotations

import logging

import pytest

from foedus.command.process import logging_to_stderr
from foedus.command.text import printable

CONTROLS = "".join(map(chr, [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]))
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_printable_strips_every_control_but_newline_and_tab() -> None:
    """ESC, the C0 and C1 controls, DEL and bidi overrides go; newline, tab and text stay."""
    assert printable(f"a{CONTROLS}b{BIDI}c\td\ne é 日本") == "abc\td\ne é 日本"
    assert printable("\x1b]0;owned\x07\x1b[2J") == "]0;owned[2J"


def test_a_logged_name_cannot_drive_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """A log line quoting others' text (an experiment's name) reaches stderr without controls."""
    with logging_to_stderr("info"):
        logging.getLogger("foedus.director.service").info("experiment %s submitted", "x\x1b[2J\ry")
    err = capsys.readouterr().err
    assert err.endswith("INFO foedus.director.service: experiment x[2Jy submitted\n"), repr(err)
