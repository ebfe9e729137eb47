"""What of a collaborator's text leaves its site: envoy.yaml's `share_with_director`, applied.

Text leaves a site for the director at two places only, and both go through here: the reason of
a collaborator's report (`shared_reason`) and the pieces of its log the director asks for
(`SharedLog`). The site's own state, files and API keep everything. By default only foedus's own
log lines leave (a runner's prints, tracebacks and other libraries' lines stay), a failure's
reason names a fixed category instead of quoting the log, and every absolute path becomes
`<site path>`. A site that keeps its metrics (envoy.yaml `share_with_aggregator.metrics: false`)
keeps them from the director too: its collaborators' round lines leave without their sample
counts and values.

The director asks for a shared log by offset; offsets are of the shared text, which is a pure
function of the log's complete lines and the settings, so an envoy started again (or asked by a
`--follow` that goes on) serves the same bytes at the same offsets. A line still being written
is shared once it ends.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from foedus.command.exits import EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM
from foedus.envoy.config import ShareWithDirector

SITE_PATH = "<site path>"
LOG_ENDS = "; its log ends: "  # in a failure's reason, before the quoted last line of the log
# The top-level packages of foedus (pyproject.toml's): a logger under one of them is foedus's own.
FOEDUS_PACKAGES = frozenset({"foedus"})
# command.process.LOG_FORMAT, "%(asctime)s %(levelname)s %(name)s: %(message)s": the collaborator's.
_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(?P<logger>[A-Za-z_][\w.]*): "
)
# collaborator.cli's line before it exits 1: a fixed category and the exception's class
# (collaborator.cli.leave_reason), never the exception's text.
_CATEGORY = re.compile(
    r"^\S+ \S+ ERROR foedus\.collaborator\.cli: failure: (?P<category>.{1,200})$"
)
# What `collaborator start`'s exit codes mean (its --help), whatever its last line says.
_BY_EXIT_CODE = {
    EXIT_BAD_INPUT: "a bad plan, certificates or runner settings",
    EXIT_SIGINT: "interrupted (SIGINT)",
    EXIT_SIGTERM: "terminated (SIGTERM)",
}
# A path: `/` or `~/` at the start of a word, or after a colon, or a file URL's (not a URL's
# `//host`, a fraction or a relative path), then characters up to a delimiter; a space goes on
# with it when the next word has a `/` too ("/srv/my data/x.csv"). A quoted one is replaced
# whole, whatever it holds, up to its quote.
_SEGMENT = r"""[^\s'"`,;:()\[\]{}<>|=]"""
_PATH = re.compile(
    rf"""(?P<quote>['"`])~?/[^'"`\n]*(?P=quote)"""
    rf"""|(?:(?<![\w.:/~\\-])|(?<=[^:/]:)(?!//)|(?<=file://))"""
    rf"""~?/{_SEGMENT}+(?: {_SEGMENT}*/{_SEGMENT}*)*"""
)
# foedus.collaborator.loop's line of each task sent: "round R: TASK on N samples: name=value ...".
_ROUND_LINE = re.compile(
    r"^(?P<head>\S+ \S+ INFO foedus\.collaborator\.loop: round \d+: [\w-]+) on \d+ samples: .*$"
)
METRICS_KEPT = ": metrics kept at the site (share_with_aggregator.metrics: false)"
_READ_BYTES = 1 << 20  # how much of a log is read at once
_MARK_EVERY = 1 << 16  # bytes of shared text between two remembered places of a log


def without_paths(text: str) -> str:
    """`text` with every absolute (or `~/`) path replaced by `<site path>`, quotes kept."""

    def replace(found: re.Match[str]) -> str:
        quote = found["quote"]
        return f"{quote}{SITE_PATH}{quote}" if quote else SITE_PATH

    return _PATH.sub(replace, text)


def failure_reason(described: str, code: int, log: Path) -> str:
    """Why a collaborator ended with an error, all of it, for the site's state.

    "`described`: CATEGORY; its log ends: LAST LINE": the category is one the envoy knows (the exit
    code's meaning, or foedus.collaborator.cli's "failure: CATEGORY" line, such as "the task runner
    failed (ValueError)"); `shared_reason` cuts what follows it.
    """
    lines = _tail_lines(log)
    category = _BY_EXIT_CODE.get(code, "")
    last_own = next((line for line in reversed(lines) if is_foedus_line(line)), "")
    found = _CATEGORY.match(last_own)  # only if foedus's last word was that failure
    if found is not None:
        category = found["category"]
    reason = f"{described}: {category}" if category else described
    return f"{reason}{LOG_ENDS}{lines[-1][:300]}" if lines else reason


def shared_reason(reason: str, share: ShareWithDirector) -> str:
    """A report's reason as the site lets it leave (`errors: category` drops the quoted log)."""
    if share.errors == "category":
        reason = reason.partition(LOG_ENDS)[0]
    return reason if share.paths else without_paths(reason)


def is_foedus_line(line: str) -> bool:
    """Whether a log line is one of foedus's loggers' (not a print, traceback or other library's)."""
    found = _LOG_LINE.match(line)
    return found is not None and found["logger"].split(".", 1)[0] in FOEDUS_PACKAGES


def shared_line(line: bytes, share: ShareWithDirector, *, metrics: bool = True) -> bytes:
    """What of one complete log line (with its newline) may leave: itself, changed, or nothing;
    `metrics` false: a round line without its counts and values."""
    if share.logs == "none":
        return b""
    if share.logs == "all" and share.paths and metrics:
        return line
    text = line.decode("utf-8", errors="replace")
    if share.logs == "foedus" and not is_foedus_line(text):
        return b""
    if not metrics:
        text = _ROUND_LINE.sub(lambda found: found["head"] + METRICS_KEPT, text.rstrip("\n"))
        text += "\n" if line.endswith(b"\n") else ""
    return (text if share.paths else without_paths(text)).encode("utf-8")


def header(share: ShareWithDirector, site: str) -> bytes:
    """The shared log's first line: what the site keeps back, so a reader is not puzzled."""
    if share.logs == "none":
        return (
            f"[site {site} shares no log lines with the director (envoy.yaml: "
            "share_with_director.logs: none)]\n"
        ).encode()
    if share.logs == "foedus":
        return (
            f"[site {site} shares only foedus's own log lines with the director (envoy.yaml: "
            "share_with_director.logs: foedus); its runner's output stays at the site]\n"
        ).encode()
    return b""


@dataclass(frozen=True)
class Mark:
    """A line boundary of a log: its first `raw` bytes make the first `shared` bytes shared."""

    raw: int
    shared: int


class SharedLog:
    """One collaborator log as the director may read it, by offsets of the shared text.

    Remembers a place every `_MARK_EVERY` shared bytes, so reading a long log piece by piece
    reads each raw byte about once; forgetting them (a restart) changes no offset. `metrics`
    false: the site keeps its metrics (`shared_line`).
    """

    def __init__(self, share: ShareWithDirector, site: str, *, metrics: bool = True) -> None:
        """Nothing read yet."""
        self.share = share
        self.metrics = metrics
        self.header = header(share, site)
        self._marks = [Mark(0, 0)]
        self._end = Mark(0, len(self.header))  # the last complete line read so far

    def read(self, path: Path, offset: int, most: int) -> tuple[int, bytes]:
        """The shared text's size so far and up to `most` of its bytes from `offset`.

        OSError if the log cannot be read.
        """
        with path.open("rb") as file:
            size = file.seek(0, 2)
            if self.share.logs == "all" and self.share.paths and self.metrics:  # as it is
                file.seek(min(offset, size))
                return size, file.read(most)
            if size < self._end.raw:  # a new log (not expected): read it afresh
                self._marks, self._end = [Mark(0, 0)], Mark(0, len(self.header))
            self._extend(file, size)
            if offset >= self._end.shared or most <= 0:
                return self._end.shared, b""
            start = self._marks[bisect_right([m.shared for m in self._marks], offset) - 1]
            data = bytearray()
            for piece in self._shared(file, start.raw, self._end.raw):
                data += piece
                if len(data) >= offset - start.shared + most:
                    break
            skip = offset - start.shared
            return self._end.shared, bytes(data[skip : skip + most])

    def _extend(self, file: BinaryIO, size: int) -> None:
        """Read the lines completed since the last read, remembering places on the way."""
        raw, shared = self._end.raw, self._end.shared
        last = self._marks[-1].shared
        for end, line in _lines(file, raw, size):
            shared += len(shared_line(line, self.share, metrics=self.metrics))
            raw = end
            if shared - last >= _MARK_EVERY:
                self._marks.append(Mark(raw, shared))
                last = shared
        self._end = Mark(raw, shared)

    def _shared(self, file: BinaryIO, start: int, end: int) -> Iterator[bytes]:
        if start == 0:
            yield self.header
        for _, line in _lines(file, start, end):
            yield shared_line(line, self.share, metrics=self.metrics)


def _lines(file: BinaryIO, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """The complete lines of `file` from `start` (a line's start) to `end`: (where it ends, line)."""
    file.seek(start)
    position = after = start
    rest = b""
    while position < end:
        block = file.read(min(_READ_BYTES, end - position))
        if not block:
            return
        position += len(block)
        data, begin = rest + block, 0
        while (newline := data.find(b"\n", begin)) != -1:
            line = data[begin : newline + 1]
            after += len(line)
            yield after, line
            begin = newline + 1
        rest = data[begin:]


def _tail_lines(path: Path, tail: int = 4096) -> list[str]:
    """The non-empty lines of a log's last `tail` bytes, stripped."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, 2)
            file.seek(max(0, size - tail))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]
