"""Whether the aggregator can serve: running, not stopping, and able to store what it is sent.

Plain Python: `foedus.aggregator.health_service` puts it on the wire as the standard gRPC health
service, `foedus.aggregator.metrics` as a gauge. The aggregator is *serving* from `start` until
`stop` while its storage works. Storage is judged by what happens, not guessed at:

* any refusal because something could not be stored (`StorageError`: a full disk, a disk gone
  read-only) marks storage failed at once; every RPC's refusal passes through `refused`, so a
  failed upload, a failed spool of the model for a download, or a failed accept all count;
* while storage is failed, `recheck` (called every `RECHECK_SECONDS` by `StorageWatch`'s thread)
  writes, syncs and removes a probe file of `PROBE_BYTES` in the storage folder (the folder
  uploads are written to, made if it is missing, as an upload would; a restart empties it, so a
  crash leaves no probe behind); when that works (space returned, the disk is back), storage is
  working again.

Nothing is probed while storage works: a working aggregator does no extra I/O for its health.
Every transition is logged, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from foedus.refusals.errors import StorageError

logger = logging.getLogger(__name__)

# How often a failed storage is probed again, and how much the probe writes: enough that a
# disk with a few blocks free is not taken for one with room for an upload's first chunks.
RECHECK_SECONDS: Final = 1.0
PROBE_BYTES: Final = 1024 * 1024
PROBE_PREFIX: Final = ".health-probe-"
STOP_SECONDS: Final = 5.0  # how long a stop waits for a probe in progress (the thread is a daemon)

Listener = Callable[[bool], object]


class Health:
    """The aggregator's health; `serving` is what probes see; listeners hear every change."""

    def __init__(self, storage_folder: Path, *, probe_bytes: int = PROBE_BYTES) -> None:
        self.storage_folder = storage_folder
        self.probe_bytes = probe_bytes
        self._lock = threading.Lock()
        self._publishing = threading.Lock()  # listeners hear one change at a time, in order
        self._running = False
        self._stopping = False
        self._storage_problem: str | None = None
        self._listeners: list[Listener] = []

    @property
    def serving(self) -> bool:
        """Whether the aggregator serves: started, not stopping, and storing what it is sent."""
        with self._lock:
            return self._serving()

    @property
    def storage_problem(self) -> str | None:
        """Why storage is failed (None: it works)."""
        with self._lock:
            return self._storage_problem

    def listen(self, listener: Listener) -> None:
        """Call `listener(serving)` now and after every change."""
        with self._publishing:
            with self._lock:
                self._listeners.append(listener)
                serving = self._serving()
            listener(serving)

    def started(self) -> None:
        """The server accepts calls."""

        def start() -> None:
            self._running = True

        if self._change(start):
            logger.info("health: SERVING")

    def stopping(self) -> None:
        """The server is stopping (for good): never serving again."""

        def stop() -> None:
            self._stopping = True

        if self._change(stop):
            logger.info("health: NOT_SERVING: the aggregator is stopping")

    def refused(self, rpc: str, code: str, error: Exception) -> None:
        """A call was refused; a refusal because something could not be stored fails storage."""
        if isinstance(error, StorageError):
            self.storage_failed(f"{rpc}: {error}")

    def storage_failed(self, problem: str) -> None:
        """Something could not be stored: not serving until `recheck` finds storage working."""
        first = [False]

        def fail() -> None:
            if self._storage_problem is None:
                self._storage_problem = problem
                first[0] = True

        self._change(fail)
        if first[0]:
            logger.error(
                "health: NOT_SERVING: cannot store (%s); checking %s every %g s until it can",
                problem,
                self.storage_folder,
                RECHECK_SECONDS,
            )

    def recheck(self) -> bool:
        """When storage is failed, probe it; True when it works (again)."""
        if self.storage_problem is None:
            return True
        problem = probe_storage(self.storage_folder, self.probe_bytes)
        if problem is not None:
            logger.debug("health: storage still failing: %s", problem)
            return False

        def recover() -> None:
            self._storage_problem = None

        serving_again = self._change(recover)
        logger.warning(
            "health: %s: storage works again in %s",
            "SERVING" if serving_again else "still NOT_SERVING",
            self.storage_folder,
        )
        return True

    def _serving(self) -> bool:
        return self._running and not self._stopping and self._storage_problem is None

    def _change(self, change: Callable[[], object]) -> bool:
        """Apply `change`; when `serving` changed, tell the listeners and return True."""
        with self._lock:
            before = self._serving()
            change()
            changed = self._serving() != before
        if changed:
            # Each telling reads the state anew, one at a time: however two changes from two
            # threads interleave, the last thing the listeners hear is how things are.
            with self._publishing:
                with self._lock:
                    serving = self._serving()
                    listeners = tuple(self._listeners)
                for listener in listeners:
                    listener(serving)
        return changed


def probe_storage(folder: Path, size: int) -> str | None:
    """Write, sync and remove a file of `size` bytes in `folder`; what went wrong, or None."""
    path: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, path = tempfile.mkstemp(dir=folder, prefix=PROBE_PREFIX)
        try:
            block = bytes(min(size, 64 * 1024))
            written = 0
            while written < size:
                written += os.write(descriptor, block[: size - written])
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        return f"{folder}: cannot write a probe file: {error.strerror or error}"
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return None


def free_bytes(folder: Path) -> float:
    """The bytes free for us in the file system of `folder` (NaN when it cannot be read)."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return float("nan")
    return float(stat.f_bavail * stat.f_frsize)


class StorageWatch:
    """A thread that calls `health.recheck()` every `interval` seconds until stopped."""

    def __init__(self, health: Health, *, interval: float = RECHECK_SECONDS) -> None:
        self.health = health
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storage-watch", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; a probe in progress gets `STOP_SECONDS` (a hung disk must not hang us)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(STOP_SECONDS)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.health.recheck()
            except Exception:  # a bug here must not end the watch, nor the aggregator
                logger.exception("health: storage check failed unexpectedly")
