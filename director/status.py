"""How the director answers a refused call: `refusals.grpc`'s one table, in the director's name.

`director.servicer` still calls `abort` from here until it is switched to `refusals.grpc`.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from refusals.grpc import answer, status_for

logger = logging.getLogger(__name__)


def abort(context: grpc.ServicerContext, method: str, error: Exception) -> NoReturn:
    """End the call with the error's status and a message for the caller; log what a person needs."""
    answer(context, method, error, status_for(context, error), service="director", log=logger)
