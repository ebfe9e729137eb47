"""The open-file limit: the aggregator holds a socket for every collaborator connected.

The soft limit is often 1024. Past it, gRPC cannot accept ("Too many open files"), and
collaborators retry until they give up: in `make bench`'s scale round, 1,100 collaborators under
a soft limit of 1024 hung with 800 descriptors open on each side. The hard limit is usually far
higher (it bounds what a process may raise itself to), so `raise_open_file_limit`, called at
start, lifts the soft limit to it, as servers commonly do, and says when even that is short of
what the plan's collaborators need.
"""

from __future__ import annotations

import logging
import resource
from typing import Final

logger = logging.getLogger(__name__)

# A connection and an upload's file for each collaborator, and the aggregator's own files
# (state, model mappings, the round's chunks, logs, gRPC's and Python's descriptors).
FILES_PER_COLLABORATOR: Final = 2
FILES_OF_ITS_OWN: Final = 128


def files_needed(collaborators: int) -> int:
    """The open files an aggregator of `collaborators` may hold at once."""
    return FILES_OF_ITS_OWN + FILES_PER_COLLABORATOR * collaborators


def raise_open_file_limit(needed: int) -> int:
    """Lift the soft open-file limit to the hard one; the soft limit now (warned if < `needed`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:  # e.g. a hard limit over the kernel's nr_open
            logger.debug("could not raise the open-file limit to %d: %s", hard, error)
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning(
            "the open-file limit is %d, and %d collaborators may need %d: raise the hard limit "
            "(ulimit -Hn, or LimitNOFILE= for a systemd service)",
            soft,
            (needed - FILES_OF_ITS_OWN) // FILES_PER_COLLABORATOR,
            needed,
        )
    return soft
