"""The aggregator's side of the unmasking: secrets rebuilt from revealed shares, the masks removed.

The survivors' (U3) masked uploads sum to their weighted, encoded deltas plus every survivor's
self-mask, plus, for each survivor i and each neighbour o of i that shared (U2) but did not
survive, +-PRG(k_io): the pairwise masks between two survivors cancel. `Unmasking.rebuild` gets
each survivor's seed and each such dropped site's mask key back from t revealed shares, checked
against what the owner advertised (its seed commitment, its mask public key); `mask(start,
stop)` is then the sum of those keystreams' slice, so the aggregator removes the masks slice by
slice, never holding more than a slice of masks, and never holding one site's update.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from foedus.secure import shamir
from foedus.secure.context import WEIGHT_TENSOR, RoundContext
from foedus.secure.errors import ProtocolViolation, TooFewSites
from foedus.secure.keys import (
    KEY_BYTES,
    agreed_key,
    mask_agreement,
    public_key_of,
    seed_commitment,
    self_mask_key,
)
from foedus.secure.masks import VectorLayout, add_masks
from foedus.secure.records import Advertisement, RevealedShare, SecretKind
from foedus.secure.ring import FixedPoint, RingArray

logger = logging.getLogger(__name__)

_SLICE = 1 << 20  # elements of a tensor unmasked and decoded at a time
MAX_SUBSETS = 64  # t-subsets of the shares tried for one secret before it counts as lost


class Unmasking:
    """What to subtract from the survivors' summed masked vector, and the model it then gives."""

    def __init__(
        self, context: RoundContext, survivors: Sequence[str], terms: Sequence[tuple[bytes, bool]]
    ) -> None:
        """`terms`: (AES key, negated) of each keystream the mask sums; use `rebuild`."""
        self.context = context
        self.survivors = tuple(sorted(survivors))
        self._terms = tuple(terms)

    @property
    def fixed_point(self) -> FixedPoint:
        """The round's ring and fixed point."""
        return self.context.fixed_point

    @classmethod
    def rebuild(
        cls,
        context: RoundContext,
        advertisements: Mapping[str, Advertisement],
        sharers: Sequence[str],
        survivors: Sequence[str],
        revealed: Mapping[str, Sequence[RevealedShare]],
    ) -> Unmasking:
        """The unmasking of a round from KEYS's advertisements, U2 (`sharers`), U3 (`survivors`)
        and the shares each survivor revealed (revealer -> shares); ProtocolViolation when a
        needed secret cannot be rebuilt or fewer than t survived."""
        u2, u3 = set(sharers), sorted(set(survivors))
        threshold = context.threshold
        if len(u3) < threshold:
            raise TooFewSites(
                f"the aggregator: round {context.round_number} has {len(u3)} survivors, below "
                f"the threshold {threshold}"
            )
        if not set(u3) <= u2 or not u2 <= set(advertisements):
            raise ProtocolViolation(
                f"the aggregator: round {context.round_number}'s survivors are not all sharers, "
                "or its sharers not all advertised"
            )
        pool = _pool(context, u2, set(u3), revealed)
        terms: list[tuple[bytes, bool]] = []
        for owner in u3:
            seed = _rebuild(context, owner, SecretKind.SELF_MASK_SEED, pool, advertisements[owner])
            terms.append((self_mask_key(context, owner, seed), False))
        for owner in sorted(u2 - set(u3)):
            live = [peer for peer in context.neighbours(owner) if peer in u3]
            if not live:
                continue  # its masks were with no survivor: none is in the sum
            private = _rebuild(
                context, owner, SecretKind.MASK_PRIVATE_KEY, pool, advertisements[owner]
            )
            for peer in live:
                key = agreed_key(
                    private,
                    advertisements[peer].mask_key,
                    mask_agreement(context, owner, peer),
                )
                # The survivor added +PRG(k) when its name is the lower, -PRG(k) otherwise.
                terms.append((key, owner < peer))
        return cls(context, u3, terms)

    def mask(self, start: int, stop: int) -> RingArray:
        """What to subtract from the survivors' summed vector at global offsets [start, stop)."""
        total = np.zeros(stop - start, dtype=self.fixed_point.dtype)
        add_masks(total, self._terms, start)
        return total

    def unmask(self, summed: RingArray, start: int) -> RingArray:
        """`summed` (the survivors' masked slice at `start`, flat) with the masks removed."""
        flat = np.ascontiguousarray(summed, dtype=self.fixed_point.dtype).reshape(-1)
        unmasked: RingArray = np.subtract(flat, self.mask(start, start + flat.size))
        return unmasked

    def total_weight(self, summed_weight: RingArray, offset: int) -> int:
        """The survivors' summed weight from their summed WEIGHT_TENSOR at `offset` (the layout's
        `weight`); ProtocolViolation when it is outside what |U3| weights of 1..max_weight give."""
        weight = self.fixed_point.decode_weight(self.unmask(summed_weight, offset))
        low, high = len(self.survivors), len(self.survivors) * self.context.settings.max_weight
        if not low <= weight <= high:
            raise ProtocolViolation(
                f"the survivors' weights sum to {weight}, outside {low}..{high}: a site uploaded "
                "a masked weight out of range"
            )
        return weight

    def updated(
        self, global_values: npt.NDArray[Any], unmasked: RingArray, total_weight: int
    ) -> npt.NDArray[Any]:
        """A tensor of the next model: `global + decode(unmasked) / total_weight` in float64, cast
        to the tensor's dtype (floats round to nearest; integers half to even, within range)."""
        values = self.fixed_point.decode(unmasked)
        values /= total_weight
        values += np.asarray(global_values, dtype=np.float64).reshape(-1)
        dtype = global_values.dtype
        if dtype.kind in "iu":
            np.rint(values, out=values)
            info = np.iinfo(dtype)
            np.clip(values, float(info.min), float(info.max), out=values)
        return values.astype(dtype).reshape(global_values.shape)

    def next_tensor(
        self,
        global_values: npt.NDArray[Any],
        summed: RingArray,
        start: int,
        total_weight: int,
    ) -> npt.NDArray[Any]:
        """One tensor of the next model from its global values and the survivors' summed masked
        tensor at `start`, a million elements at a time (float64 scratch stays a few MB)."""
        result = np.empty(global_values.shape, dtype=global_values.dtype)
        out, old, total = result.reshape(-1), global_values.reshape(-1), summed.reshape(-1)
        for begin in range(0, out.size, _SLICE):
            end = min(begin + _SLICE, out.size)
            unmasked = self.unmask(total[begin:end], start + begin)
            out[begin:end] = self.updated(old[begin:end], unmasked, total_weight)
        return result

    def next_model(
        self, model: Mapping[str, npt.NDArray[Any]], summed: Mapping[str, RingArray]
    ) -> dict[str, npt.NDArray[Any]]:
        """The next global model from the round's `model` and the survivors' summed uploads
        (model names and WEIGHT_TENSOR), tensor by tensor."""
        layout = VectorLayout.of_arrays(model)
        weight = self.total_weight(summed[WEIGHT_TENSOR], layout.weight)
        return {
            name: self.next_tensor(model[name], summed[name], start, weight)
            for name, (start, _stop) in layout.slices.items()
        }


def _pool(
    context: RoundContext,
    sharers: set[str],
    survivors: set[str],
    revealed: Mapping[str, Sequence[RevealedShare]],
) -> dict[str, dict[int, bytes]]:
    """owner -> point -> share, of the right kind only, from survivors that hold the owner's."""
    pool: dict[str, dict[int, bytes]] = {}
    for revealer, shares in sorted(revealed.items()):
        if revealer not in survivors:
            logger.warning(
                "round %d: shares revealed by %r, not a survivor, ignored",
                context.round_number,
                revealer,
            )
            continue
        for share in shares:
            owner = share.owner
            expected = (
                SecretKind.SELF_MASK_SEED if owner in survivors else SecretKind.MASK_PRIVATE_KEY
            )
            if owner not in sharers or revealer not in context.holders(owner):
                problem = f"{revealer!r} holds no share of {owner!r}"
            elif share.kind is not expected:
                problem = f"{revealer!r} revealed the wrong kind of {owner!r}'s secret"
            else:
                pool.setdefault(owner, {})[context.point(revealer)] = share.share
                continue
            logger.warning("round %d: a revealed share ignored: %s", context.round_number, problem)
    return pool


def _rebuild(
    context: RoundContext,
    owner: str,
    kind: SecretKind,
    pool: Mapping[str, Mapping[int, bytes]],
    advertisement: Advertisement,
) -> bytes:
    """`owner`'s secret of `kind` from t of its shares that matches its advertisement."""
    shares = pool.get(owner, {})
    threshold = context.threshold
    what = "self-mask seed" if kind is SecretKind.SELF_MASK_SEED else "mask private key"
    if len(shares) < threshold:
        raise ProtocolViolation(
            f"the aggregator cannot rebuild {owner!r}'s {what}: {len(shares)} shares revealed, "
            f"{threshold} needed"
        )
    subsets = itertools.islice(itertools.combinations(sorted(shares), threshold), MAX_SUBSETS)
    for points in subsets:
        try:
            secret = shamir.combine({x: shares[x] for x in points}, KEY_BYTES)
        except ValueError:
            continue
        if kind is SecretKind.SELF_MASK_SEED:
            matches = seed_commitment(context, owner, secret) == advertisement.seed_commitment
        else:
            matches = public_key_of(secret) == advertisement.mask_key
        if matches:
            return secret
    raise ProtocolViolation(
        f"the aggregator cannot rebuild {owner!r}'s {what}: no {threshold} of its "
        f"{len(shares)} revealed shares match what it advertised ({MAX_SUBSETS} subsets tried at most)"
    )
