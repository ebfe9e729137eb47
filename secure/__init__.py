"""Secure aggregation (SecAgg, Bonawitz et al. 2017, with SecAgg+'s neighbours): the aggregator
learns the weighted sum of the sites' updates, never one of them.

One round r, over the plan's collaborators C (sorted) and the threshold t:

1. KEYS: each site makes two X25519 key pairs (c: shares are sealed to it, s: pairwise masks) and
   a 32-byte self-mask seed b, and posts its public keys and a commitment to b, signed with its
   certificate's private key over the federation's uuid and the round (`keys.advertised_bytes`).
   Every site checks the advertisements whose keys it uses (with `neighbours`: its neighbours')
   against the federation's CA and the plan's names.
2. SHARES: each site splits b and s's private bytes into Shamir shares (t rebuild either) for
   its holders (its neighbours and itself), each sealed with AES-256-GCM for its holder.
3. MASKED UPLOAD: each site encodes its weighted delta into the ring Z_(2^bits) (`ring`), adds
   its self-mask PRG(b) and, for each neighbour that shared, +-PRG(k_ij) agreed with s (the signs
   cancel in the sum), and uploads the masked vector and its masked weight.
4. SURVIVORS: the aggregator names those who uploaded; each confirms the list by a signature.
5. UNMASK: once t confirmations agree, each survivor reveals, for every owner it holds a share
   of, the share of b (the owner survived) or of s (it dropped), never both kinds for one owner;
   the aggregator rebuilds the secrets and removes the masks from the sum (`unmask.Unmasking`).

The package is plain Python without a socket: `site.SiteRound` is a site's side, `unmask` the
aggregator's arithmetic; the aggregator's stages and the collaborator's driving live in their
services, the wire in `wire`. Masks are AES-256-CTR keystreams (`masks`); keys, signatures and
certificate checks are in `keys`; the records the stages exchange in `records`.
"""

from foedus.secure.context import WEIGHT_TENSOR, RoundContext
from foedus.secure.errors import ProtocolViolation, SecretsFileError, TooFewSites
from foedus.secure.masks import VectorLayout
from foedus.secure.records import (
    Advertisement,
    RevealedShare,
    SealedShare,
    SecretKind,
    SurvivorConfirmation,
)
from foedus.secure.ring import FixedPoint
from foedus.secure.site import SiteRound
from foedus.secure.site_secrets import SiteSecrets
from foedus.secure.unmask import Unmasking

__all__ = [
    "WEIGHT_TENSOR",
    "Advertisement",
    "FixedPoint",
    "ProtocolViolation",
    "RevealedShare",
    "RoundContext",
    "SealedShare",
    "SecretKind",
    "SecretsFileError",
    "SiteRound",
    "SiteSecrets",
    "SurvivorConfirmation",
    "TooFewSites",
    "Unmasking",
    "VectorLayout",
]
