"""What both gRPC services share: the caller's name from its certificate, a server's binding."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest

from foedus.aggregator.identity import Gatekeeper
from foedus.director.identity import Roster
from foedus.protos.channel import host_port
from foedus.refusals.errors import AuthenticationError
from foedus.serving.identity import caller_name
from foedus.serving.server import ServerError, Serving

AGGREGATOR_REFUSAL = (
    "no usable client certificate: the aggregator requires a certificate with one common name, "
    "issued by this federation's CA"
)
DIRECTOR_REFUSAL = (
    "no usable client certificate: the director requires a certificate with one common name, "
    "issued by its CA"
)


@pytest.mark.parametrize("names", [[], [""], ["alice", "bob"]], ids=["none", "empty", "two"])
def test_a_certificate_without_one_common_name_is_refused_in_each_services_words(
    names: list[str],
) -> None:
    """No name, an empty one or two: UNAUTHENTICATED's refusal says what each service requires."""
    gatekeeper = Gatekeeper("aggregator", "fed", frozenset({"alice", "bob"}))
    roster = Roster(frozenset({"alice", "bob"}), frozenset(), frozenset())
    with pytest.raises(AuthenticationError) as aggregator:
        gatekeeper.identify(names, None)
    with pytest.raises(AuthenticationError) as director:
        roster.identify(names, None)
    assert (str(aggregator.value), str(director.value)) == (AGGREGATOR_REFUSAL, DIRECTOR_REFUSAL)


def test_the_one_common_name_is_the_callers() -> None:
    """A certificate with exactly one common name names its caller."""
    assert caller_name(["alice"], service="the aggregator", issuer="its CA") == "alice"


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", "127.0.0.1:50051"), ("::1", "[::1]:50051"), ("[::1]", "[::1]:50051")],
)
def test_host_port_puts_an_ipv6_host_in_brackets(host: str, expected: str) -> None:
    """host:port as gRPC takes it (a server's binding, a channel's target), an IPv6 host bracketed
    once."""
    assert host_port(host, 50051) == expected


class _Bare(Serving):
    """A server with no service: only its binding is under test."""

    def __init__(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))

    def start(self) -> int:
        return 0

    def stop(self, grace: float = 0) -> None:
        self._server.stop(grace)


def test_an_address_in_use_is_a_server_error_naming_it() -> None:
    """Binding a port another socket holds is `ServerError` with the address, not a bare 0."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        server = _Bare()
        try:
            with pytest.raises(ServerError, match=f"cannot listen on {address}"):
                server._bind(address, None)
        finally:
            server.stop()
