"""Text from others made safe for a terminal: no escape sequences, no control characters.

Names, descriptions, labels, reasons and log lines come from other people and other hosts; a
terminal obeys what they hold (ESC starts a sequence that can move the cursor, rewrite a line,
set the window's title). They are stored as sent and made printable where a command prints
them (its output, its error line, its log on stderr): few places, all here, and nothing a sender
chose reaches a person's terminal raw.
"""

from __future__ import annotations

import logging
import re
from typing import TextIO, cast

# ESC and the other C0 controls but tab and newline, DEL, the C1 controls, and the
# bidirectional overrides that show a line in another order than it is.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` without terminal controls (newlines and tabs kept)."""
    return _UNPRINTABLE.sub("", text)


class _PrintableStream:
    """A text stream whose every write is made `printable` first."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        """Write `text` without its terminal controls."""
        return self._stream.write(printable(text))

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def printable_stream(stream: TextIO) -> TextIO:
    """`stream`, writing only printable text (for a command's output of others' text)."""
    return cast(TextIO, _PrintableStream(stream))


class PrintableFormatter(logging.Formatter):
    """A log line without terminal controls: a logged name or reason cannot drive the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted line, made `printable`."""
        return printable(super().format(record))
