"""The next global model of a round with differential privacy (DP-FedAvg, McMahan et al. 2018),
computed a slice at a time from the reporters' uploads: each site's update clipped, the clipped
updates summed, Gaussian noise added to the sum, the sum divided by the number of sites.

The site clips its update before it sends it (`foedus.collaborator.loop`); the aggregator clips
it again, so the guarantee does not rest on a site's honesty. Every site weighs the same: a
weight by data size would scale one site's influence past `clip`. The noise of each slice is a
function of the federation's secret, the round, the tensor and the slice's bounds
(`foedus.privacy.noise`), so a round computed again after a restart gets the very same model.

Under adaptive clipping (`foedus.privacy.adaptive`) a round clips to its own clip, known when it
opens, with the update's share of the noise multiplier (`Privacy.round_settings`), and its clip
factors give the next round's clip (`Privacy.next_clip`).

The uploads' clip factors and the noise need nothing the close decides: the federation has them
made while the round is open (`foedus.aggregator.dp_ahead`, `Privacy.ahead`), and the close
computes only what was not made by then, the same way, so the model is the same either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from foedus.aggregator.dp_ahead import RoundAhead, model_slices, scaled_noise
from foedus.aggregator.fedavg import (
    AVERAGING_THREADS,
    SLICE_ELEMENTS,
    SliceSink,
    TensorSource,
    collect_slices,
)
from foedus.aggregator.records import Array
from foedus.plans.schema import DifferentialPrivacySettings
from foedus.privacy.adaptive import next_clip
from foedus.privacy.clipping import add_clipped, source_clip_factor
from foedus.privacy.noise import NoiseSecret, not_noisable


@dataclass(frozen=True)
class Privacy:
    """A DP federation's settings and noise secret: what its rounds' close needs."""

    settings: DifferentialPrivacySettings
    secret: NoiseSecret  # its key never in a log line, not even a repr

    def round_settings(self, clip: float | None) -> DifferentialPrivacySettings:
        """The settings a round clips and noises by: the plan's, or under adaptive clipping
        the round's `clip` with the update's share of the noise multiplier
        (`AdaptiveClippingSettings.update_noise_multiplier`)."""
        adaptive = self.settings.adaptive_clipping
        if adaptive is None:
            return self.settings
        return dataclasses.replace(
            self.settings,
            clip=self.settings.clip if clip is None else clip,
            noise_multiplier=adaptive.update_noise_multiplier(self.settings.noise_multiplier),
        )

    def next_model(
        self,
        reference: Mapping[str, Array],
        uploads: Mapping[str, TensorSource],
        round_number: int,
        *,
        clip: float | None = None,
        ahead: RoundAhead | None = None,
    ) -> PrivateModel:
        """Round `round_number`'s next global model from the reporters' `uploads`, with what
        `ahead` made of it while the round was open (stopped by now); `clip`: the round's
        under adaptive clipping."""
        return PrivateModel(
            reference,
            uploads,
            settings=self.round_settings(clip),
            secret=self.secret,
            round_number=round_number,
            ahead=ahead,
        )

    def ahead(
        self, round_number: int, reference: Mapping[str, Array], *, clip: float | None = None
    ) -> RoundAhead:
        """Round `round_number`'s clip factors and noise, made from now on (its global model
        `reference`), for `next_model`; `clip`: the round's under adaptive clipping (known when
        the round opens, so its work is made ahead too)."""
        return RoundAhead(self.round_settings(clip), self.secret, round_number, reference).start()

    def next_clip(self, clip: float | None, model: PrivateModel, round_number: int) -> float | None:
        """Under adaptive clipping, the clip of the round after `round_number`, which clipped
        `model`'s uploads to `clip` (`foedus.privacy.adaptive`); None when the clip is fixed."""
        adaptive = self.settings.adaptive_clipping
        if adaptive is None:
            return None
        return next_clip(
            adaptive,
            self.secret,
            round_number,
            self.settings.clip if clip is None else clip,
            model.factors,
            initial=self.settings.clip,
        )


class PrivateModel:
    """The next global model of a DP round before it is computed, with the same `into` and
    `arrays` as `foedus.aggregator.records.AveragedModel`: for each slice, new = global +
    (sum over sites of factor x (upload - global) + noise) / sites, in float64, cast back to
    the tensor's dtype. Each site's factor (at most 1) brings its whole update's L2 norm to at
    most `settings.clip`; the noise has std `settings.noise_multiplier x settings.clip`."""

    def __init__(
        self,
        reference: Mapping[str, Array],
        uploads: Mapping[str, TensorSource],
        *,
        settings: DifferentialPrivacySettings,
        secret: NoiseSecret,
        round_number: int,
        slice_elements: int = SLICE_ELEMENTS,
        workers: int = AVERAGING_THREADS,
        ahead: RoundAhead | None = None,
    ) -> None:
        """`uploads`: each reporter's trained model (the reference's names, shapes, dtypes);
        `ahead`: the round's factors and noise made so far, used where they were made for this
        round and these slices."""
        if not uploads:
            raise ValueError("nothing to aggregate: no uploads")
        refused = not_noisable({name: np.asarray(like) for name, like in reference.items()})
        if refused is not None:
            raise ValueError(f"{refused}: differential privacy needs floating-point tensors")
        self.reference = {name: reference[name] for name in sorted(reference)}
        self._uploads = [uploads[name] for name in sorted(uploads)]
        self._settings = settings
        self._secret = secret
        self._round = round_number
        self._slice = slice_elements
        self._workers = max(1, workers)
        usable = (
            ahead is not None
            and ahead.round_number == round_number
            and ahead.slice_elements == slice_elements
            and ahead.settings == settings  # the same clip, under adaptive clipping
        )
        self._ahead = ahead if usable else None
        made = [
            None if self._ahead is None else self._ahead.factor(name) for name in sorted(uploads)
        ]
        self.factors = self._factors(made)  # computed first: a pass over each upload not made

    def _factors(self, made: list[float | None]) -> tuple[float, ...]:
        """Each upload's clip factor, in upload order: `made` where it is not None, else
        computed; with `workers` > 1 the uploads to compute are shared out among that many
        threads (each factor computed whole by one, so the same bits)."""

        def factor(index: int) -> float:
            done = made[index]
            if done is not None:
                return done
            return source_clip_factor(
                self.reference,
                self._uploads[index],
                self._settings.clip,
                slice_elements=self._slice,
            )

        missing = sum(done is None for done in made)
        if self._workers == 1 or missing <= 1:
            return tuple(factor(index) for index in range(len(self._uploads)))
        errors = np.geterr()  # numpy's error handling is per thread: the caller's holds in all

        def factor_in_thread(index: int) -> float:
            with np.errstate(**errors):
                return factor(index)

        workers = min(self._workers, missing)
        with ThreadPoolExecutor(workers, thread_name_prefix="dp-clip") as pool:
            return tuple(pool.map(factor_in_thread, range(len(self._uploads))))

    def _slices(self) -> Iterator[tuple[str, int, int]]:
        """(tensor, start, stop), a slice at a time, tensors in name order."""
        return model_slices(self.reference, self._slice)

    def into(self, sink: SliceSink) -> None:
        """Compute the model a slice at a time, handing each slice to `sink` (the tensor's dtype).

        With `workers` > 1 the slices are shared out among that many threads (numpy, the reads
        and AES release the GIL), every n-th to each, and come to `sink` in no particular order;
        each value sees the same operations whichever thread computes it.
        """
        bounds = list(self._slices())
        if self._workers == 1 or len(bounds) <= 1:
            for name, start, stop in bounds:
                sink(name, start, self._computed(name, start, stop))
            return
        errors = np.geterr()  # numpy's error handling is per thread: the caller's holds in all

        def every_nth(index: int) -> None:
            with np.errstate(**errors):
                for name, start, stop in bounds[index :: self._workers]:
                    sink(name, start, self._computed(name, start, stop))

        with ThreadPoolExecutor(self._workers, thread_name_prefix="dp-fedavg") as pool:
            for done in [pool.submit(every_nth, index) for index in range(self._workers)]:
                done.result()  # raises what the thread raised

    def _computed(self, name: str, start: int, stop: int) -> Array:
        """Elements [start, stop) of the new tensor `name`: global + (sum of the clipped
        updates + noise) / sites in float64, rounded once to the tensor's dtype."""
        like = np.asarray(self.reference[name])
        base = like.reshape(-1)[start:stop].astype(np.float64)  # once, not once per upload
        total = np.zeros(stop - start, dtype=np.float64)
        scratch = np.empty(stop - start, dtype=np.float64)  # each upload's difference, in turn
        for factor, source in zip(self.factors, self._uploads, strict=True):
            add_clipped(total, _read(source, name, start, stop), base, factor, scratch=scratch)
        noise = None if self._ahead is None else self._ahead.noise(name, start, stop)
        if noise is None:  # not made while the round was open
            noise = scaled_noise(self._settings, self._secret, self._round, (name, start, stop))
        total += noise
        total /= len(self._uploads)
        total += base
        out = np.empty(stop - start, dtype=like.dtype)
        np.copyto(out, total, casting="unsafe")
        return out

    def arrays(self) -> dict[str, Array]:
        """Compute the model into arrays in memory."""
        return collect_slices(self.reference, self.into)


def _read(source: TensorSource, name: str, start: int, stop: int) -> Array:
    """Elements [start, stop) of tensor `name` from one upload, checked for length."""
    values = source.read(name, start, stop)
    if values.shape != (stop - start,):
        raise ValueError(
            f"tensor {name!r}: reading [{start}, {stop}) gave shape {list(values.shape)}"
        )
    return values
