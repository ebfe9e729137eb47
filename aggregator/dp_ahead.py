"""What a DP-FedAvg round's close needs, made while the round is still open.

The close of a round with differential privacy (`foedus.aggregator.dp_model.PrivateModel`)
needs, beyond what a plain average needs, each upload's clip factor (a pass over the upload for
its norm) and the noise of the whole model (AES-CTR and Box-Muller: about 0.6 s of CPU per
100 MB here). Neither depends on anything the close decides: the noise of round r is a function
of the federation's secret and r alone, and an upload's factor of the upload and the round's
model. So one thread per round (`RoundAhead`) computes them while the round waits for its
results: each accepted upload's factor first (its file was just written, its pages are in
the page cache), and in between the noise, a slice at a time, up to `NOISE_AHEAD_BYTES` of it
(float64: twice a float32 model's size) so that the memory it holds is bounded whatever the
model's size.

The close stops the thread, takes what is done, and computes what is not, with the same
functions and the same slices: the model is the very same, bit for bit, whatever the thread
got done (nothing of it is kept on disk: a restarted aggregator computes it again). The noise
lies in one block of memory, a mapping of its own that is given back to the system whole
once the close is done with it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager

import numpy as np

from foedus.aggregator.fedavg import SLICE_ELEMENTS, TensorSource
from foedus.aggregator.records import Array
from foedus.plans.schema import DifferentialPrivacySettings
from foedus.privacy.clipping import source_clip_factor
from foedus.privacy.noise import Float64Array, NoiseSecret, gaussian

logger = logging.getLogger(__name__)

# The noise made ahead, at most (float64): a 128 MB float32 model's whole noise. Past that the
# close makes the rest, so a large model costs the aggregator no more memory than this.
NOISE_AHEAD_BYTES = 256 * 2**20
# Opens an accepted upload for reading; closed when the factor is made.
UploadOpener = Callable[[], AbstractContextManager[TensorSource]]


def model_slices(
    reference: Mapping[str, Array], slice_elements: int
) -> Iterator[tuple[str, int, int]]:
    """(tensor, start, stop) of every slice of `reference`, tensors in name order: how a DP
    round's close and its noise made ahead cut the model alike."""
    for name in sorted(reference):
        size = int(np.size(reference[name]))
        for start in range(0, size, slice_elements):
            yield name, start, min(start + slice_elements, size)


def scaled_noise(
    settings: DifferentialPrivacySettings,
    secret: NoiseSecret,
    round_number: int,
    piece: tuple[str, int, int],
    *,
    out: Float64Array | None = None,
) -> Float64Array:
    """Elements [start, stop) of the noise round `round_number` adds to the sum of clipped
    updates of tensor `tensor`, for `piece` = (tensor, start, stop): standard normals
    (`foedus.privacy.noise`) times noise_multiplier x clip; into `out` when given."""
    noise = gaussian(secret, round_number, *piece)
    scale = settings.noise_multiplier * settings.clip
    if out is None:
        noise *= scale  # in place: the same bits
        return noise
    np.multiply(noise, scale, out=out)  # the same product, stored elsewhere
    return out


class RoundAhead:
    """One DP round's clip factors and noise, made by a thread of its own while the round is
    open (`start`), handed to the close (`factor`, `noise`) once it has stopped them (`stop`).

    `reference` is the round's global model; `slice_elements` must be the close's (a factor's
    float64 sums follow the slices). Thread-safe.
    """

    def __init__(
        self,
        settings: DifferentialPrivacySettings,
        secret: NoiseSecret,
        round_number: int,
        reference: Mapping[str, Array],
        *,
        slice_elements: int = SLICE_ELEMENTS,
        noise_bytes: int = NOISE_AHEAD_BYTES,
    ) -> None:
        self.round_number = round_number
        self.slice_elements = slice_elements
        self.settings = settings  # the round's: its clip and noise multiplier
        self._secret = secret
        self._reference = {name: reference[name] for name in sorted(reference)}
        # The noise still to make, in the close's order, each slice with its place in one block
        # of memory (a mapping of its own, given back whole once the close has dropped it,
        # rather than hundreds of slices among the uploads' buffers in the allocator's heaps).
        self._planned: deque[tuple[str, int, int, int]] = deque()
        held = 0
        for name, start, stop in model_slices(reference, slice_elements):
            if (held + stop - start) * 8 > noise_bytes:
                break
            self._planned.append((name, start, stop, held))
            held += stop - start
        self._held = held
        self._block: Float64Array | None = None  # made by the thread as it starts on the noise
        self._uploads: deque[tuple[str, UploadOpener]] = deque()
        self._factors: dict[str, float] = {}
        self._noise: dict[tuple[str, int, int], Float64Array] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None  # while there is something to make

    def start(self) -> RoundAhead:
        """Start making the round's noise (and the factors of the uploads accepted)."""
        with self._lock:
            self._run()
        return self

    def accepted(self, site: str, opener: UploadOpener) -> None:
        """`site`'s upload was accepted: make its clip factor next (`opener` opens it)."""
        with self._lock:
            if not self._stopped:
                self._uploads.append((site, opener))
                self._run()

    def stop(self) -> None:
        """Make nothing more: the thread ends after the piece it is on (dropped if unfinished)."""
        with self._lock:
            self._stopped = True
            self._uploads.clear()
            self._planned.clear()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the thread to end; whether it has (or none was running)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _run(self) -> None:
        """A thread for what there is to make, unless one is at it (under the lock)."""
        if self._thread is None and not self._stopped and (self._uploads or self._planned):
            self._thread = threading.Thread(
                target=self._work, name=f"dp-ahead-{self.round_number}", daemon=True
            )
            self._thread.start()

    def factor(self, site: str) -> float | None:
        """`site`'s upload's clip factor, if it was made (None: the close makes it)."""
        with self._lock:
            return self._factors.get(site)

    def noise(self, tensor: str, start: int, stop: int) -> Float64Array | None:
        """The scaled noise of that slice if it was made (None: the close makes it), handed
        over once: a view of the round's block of noise, which goes with the last of them."""
        with self._lock:
            return self._noise.pop((tensor, start, stop), None)

    def _work(self) -> None:
        """The thread: uploads' factors first, then the noise; it ends when there is nothing
        left to make (an upload accepted later starts another) or once stopped."""
        with np.errstate(all="ignore"):  # the close warns of what it computes, once
            while True:
                with self._lock:
                    if self._stopped or not (self._uploads or self._planned):
                        self._thread = None
                        return
                    upload = self._uploads.popleft() if self._uploads else None
                    piece = None if upload is not None else self._planned.popleft()
                try:
                    if upload is not None:
                        self._make_factor(*upload)
                    elif piece is not None:
                        self._make_noise(*piece)
                except Exception:  # the close computes it again, and says what is wrong
                    with self._lock:
                        stopped = self._stopped  # a close under way may have tidied its files
                    if not stopped:
                        logger.warning(
                            "round %d: computing ahead for its close failed; the close computes it",
                            self.round_number,
                            exc_info=True,
                        )

    def _make_factor(self, site: str, opener: UploadOpener) -> None:
        with opener() as source:
            factor = source_clip_factor(
                self._reference, source, self.settings.clip, slice_elements=self.slice_elements
            )
        with self._lock:
            if not self._stopped:
                self._factors[site] = factor

    def _make_noise(self, tensor: str, start: int, stop: int, offset: int) -> None:
        if self._block is None:
            self._block = np.empty(self._held, dtype=np.float64)
        noise = scaled_noise(
            self.settings,
            self._secret,
            self.round_number,
            (tensor, start, stop),
            out=self._block[offset : offset + stop - start],
        )
        with self._lock:
            if not self._stopped:
                self._noise[(tensor, start, stop)] = noise
