"""Request fields checked for form and range before anything looks them up or stores them.

One place for the gRPC servicer and the dashboard: an id that is no UUID names nothing, an offset
past what a file can hold is no offset, free text is bounded; each refusal is an
`InvalidRequestError` naming the field and quoting its value cut (`foedus.plans.loader.shown`), so
an answer never echoes a huge value back.
"""

from __future__ import annotations

import re

from foedus.plans.reader import shown
from foedus.refusals.errors import InvalidRequestError

# Every id the director makes is a UUID (str(uuid.uuid4())): anything else names nothing.
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_OFFSET = 2**63 - 1  # a file offset (off_t) is a signed 64-bit integer


def checked_id(field: str, value: str) -> str:
    """`value`, a UUID as the director makes them; `InvalidRequestError` quoting it cut if not."""
    if not value:
        raise InvalidRequestError(f"{field}: required")
    if not UUID.match(value):
        raise InvalidRequestError(
            f"{field}: {shown(value)} is not an id of this director (a UUID, as "
            "'experiment list' shows them)"
        )
    return value


def checked_offset(field: str, value: int) -> int:
    """A position in a file or a list: 0 to `MAX_OFFSET`."""
    if not 0 <= value <= MAX_OFFSET:
        raise InvalidRequestError(f"{field}: {value} is past the largest offset, {MAX_OFFSET}")
    return value


def checked_length(field: str, text: str, limit: int) -> str:
    """`text`, refused when longer than `limit` characters."""
    if len(text) > limit:
        raise InvalidRequestError(f"{field}: {len(text)} characters; at most {limit}")
    return text
