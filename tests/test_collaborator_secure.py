"""The collaborator's part in secure aggregation: its round files, its two calls, its stages.

Real parts: the round files on disk, a real gRPC server over mutual TLS with the federation's
certificates made by `pki`, and the sites' protocol (`foedus.secure.SiteRound`) behind the loop.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from foedus.collaborator.client import AggregatorGRPCClient
from foedus.collaborator.errors import ResponseValidationError
from foedus.collaborator.secure_state import RoundFile, RoundFileError, RoundFiles
from foedus.pki.layout import CertsLayout
from foedus.pki.tls import server_credentials
from foedus.plans import Plan
from foedus.protos import aggregator_pb2, aggregator_pb2_grpc
from foedus.secure import SealedShare
from foedus.secure.wire import Post, Relay, Stage, post_from_proto, relay_to_proto

from servers import make_plan

UUID = "test-federation-0001"


def test_a_round_file_is_private_durable_and_read_back(tmp_path: Path) -> None:
    """The file is mode 0600 in a folder of mode 0700 and reads back as written."""
    files = RoundFiles(tmp_path / "state" / "alice", UUID, "alice")
    file = files.new(3, b"secret bytes").with_post("KEYS", b"\x00\x01keys")
    files.write(file)
    path = files.path(3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert files.read(3) == file
    assert files.read(4) is None
    assert files.rounds() == [3]


def test_rewriting_a_round_file_keeps_what_was_posted(tmp_path: Path) -> None:
    """Each stage's post is added to the file; the secrets can be replaced with what was revealed."""
    files = RoundFiles(tmp_path, UUID, "alice")
    file = files.new(0, b"first").with_post("KEYS", b"k")
    files.write(file)
    file = file.with_post("SHARES", b"s").with_secrets(b"revealed")
    files.write(file)
    read = files.read(0)
    assert read is not None
    assert dict(read.posted) == {"KEYS": b"k", "SHARES": b"s"}
    assert read.secrets == b"revealed"


def test_rounds_over_are_erased(tmp_path: Path) -> None:
    """Files of rounds before the one the aggregator names are erased; None erases every one."""
    files = RoundFiles(tmp_path, UUID, "alice")
    for number in (1, 2, 3):
        files.write(files.new(number, b"x"))
    (tmp_path / ".round-4.json.0123456789ab.tmp").write_bytes(b"cut")  # a crash mid-write
    assert files.erase_before(3) == [1, 2]
    assert files.rounds() == [3]
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["round-3.json"]
    assert files.erase_before(None) == [3]
    assert list(tmp_path.iterdir()) == []
    assert RoundFiles(tmp_path / "never-made", UUID, "alice").erase_before(None) == []


@pytest.mark.parametrize(
    "content",
    [
        b"{cut",
        b"[]",
        json.dumps({"format": "something else"}).encode(),
        b"\xff\xfe",
    ],
)
def test_a_corrupt_round_file_is_one_line_naming_it(tmp_path: Path, content: bytes) -> None:
    """A file that does not read as a round file stops the site with one line naming it."""
    files = RoundFiles(tmp_path, UUID, "alice")
    files.path(2).write_bytes(content)
    with pytest.raises(RoundFileError) as raised:
        files.read(2)
    message = str(raised.value)
    assert message.startswith(f"{files.path(2)}: cannot read this secure round file")
    assert "\n" not in message


def test_a_bad_base64_field_is_refused(tmp_path: Path) -> None:
    """A secrets field that is not base64 is a corrupt file, not a crash."""
    files = RoundFiles(tmp_path, UUID, "alice")
    files.write(files.new(0, b"x"))
    document = json.loads(files.path(0).read_bytes())
    document["secrets"] = "not base64!"
    files.path(0).write_text(json.dumps(document))
    with pytest.raises(RoundFileError, match="not base64"):
        files.read(0)


@pytest.mark.parametrize(("uuid", "name"), [("another-federation", "alice"), (UUID, "bob")])
def test_another_sites_or_federations_file_is_refused(tmp_path: Path, uuid: str, name: str) -> None:
    """A file another collaborator or federation wrote in this folder is never taken as ours."""
    RoundFiles(tmp_path, uuid, name).write(RoundFile(uuid, name, 1, b"theirs"))
    with pytest.raises(RoundFileError, match="give each collaborator and federation its own"):
        RoundFiles(tmp_path, UUID, "alice").read(1)


# -- the client's two calls, against a real server over mutual TLS ---------------------------------


class RelayServicer(aggregator_pb2_grpc.AggregatorServicer):
    """A scripted aggregator: records each post, answers each relay request from `relays` in turn,
    and loses the first `unavailable` calls of each RPC (UNAVAILABLE, as a network failure)."""

    def __init__(self, relays: list[Relay], *, unavailable: int = 0) -> None:
        self.posts: list[aggregator_pb2.SecureMessage] = []
        self.relay_requests: list[aggregator_pb2.SecureRelayRequest] = []
        self.relays = relays
        self.unavailable = unavailable
        self.calls: dict[str, int] = {}

    def _lose(self, rpc: str, context: grpc.ServicerContext) -> None:
        self.calls[rpc] = self.calls.get(rpc, 0) + 1
        if self.calls[rpc] <= self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "lost on the way")

    @staticmethod
    def _header(request_header: aggregator_pb2.MessageHeader) -> aggregator_pb2.MessageHeader:
        return aggregator_pb2.MessageHeader(
            sender=request_header.receiver,
            receiver=request_header.sender,
            federation_uuid=request_header.federation_uuid,
        )

    def PostSecureMessage(  # noqa: N802 - the RPC's name
        self, request: aggregator_pb2.SecureMessage, context: grpc.ServicerContext
    ) -> aggregator_pb2.SecureReceipt:
        self.posts.append(request)
        self._lose("PostSecureMessage", context)
        return aggregator_pb2.SecureReceipt(header=self._header(request.header))

    def GetSecureRelay(  # noqa: N802 - the RPC's name
        self, request: aggregator_pb2.SecureRelayRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.SecureRelay:
        self.relay_requests.append(request)
        self._lose("GetSecureRelay", context)
        relay = self.relays.pop(0)
        return relay_to_proto(relay, self._header(request.header))


@contextmanager
def relay_server(plan: Plan, servicer: RelayServicer) -> Iterator[int]:
    """A real TLS server with the aggregator's certificate around `servicer`; yields its port."""
    certs = plan.tls.certs
    assert certs is not None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    aggregator_pb2_grpc.add_AggregatorServicer_to_server(servicer, server)
    credentials = server_credentials(certs.aggregator_cert, certs.aggregator_key, certs.ca_bundle)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait()


def client_for(plan: Plan, port: int, name: str = "alice") -> AggregatorGRPCClient:
    """A client of `plan` dialling 127.0.0.1:`port`, whose backoff waits for nothing."""
    return AggregatorGRPCClient.from_plan(
        plan, name, aggregator_address="127.0.0.1", aggregator_port=port, sleep=lambda _: None
    )


def test_a_post_is_sent_again_after_unavailable(certs: CertsLayout) -> None:
    """A post lost on the way is retried, the very same message each time, as every unary call."""
    plan = make_plan(certs)
    servicer = RelayServicer([], unavailable=2)
    share = SealedShare(sender="alice", receiver="bob", ciphertext=b"\x01" * 60)
    post = Post(4, Stage.SHARES, shares=(share,))
    with relay_server(plan, servicer) as port, client_for(plan, port) as client:
        client.post_secure_message(post)
    assert len(servicer.posts) == 3
    assert len({message.SerializeToString(deterministic=True) for message in servicer.posts}) == 1
    assert post_from_proto(servicer.posts[0]) == post
    assert servicer.posts[0].header.sender == "alice"


def test_a_relay_is_fetched_again_after_unavailable(certs: CertsLayout) -> None:
    """A relay request lost on the way is retried; the relay arrives as the aggregator sent it."""
    plan = make_plan(certs)
    relay = Relay(2, Stage.KEYS, ready=True, members=("alice", "bob"))
    servicer = RelayServicer([relay, relay], unavailable=1)
    with relay_server(plan, servicer) as port, client_for(plan, port) as client:
        assert client.get_secure_relay(2, Stage.KEYS) == relay
    assert [request.round_number for request in servicer.relay_requests] == [2, 2]


@pytest.mark.parametrize(
    ("relay", "says"),
    [
        (
            Relay(3, Stage.KEYS, ready=True),
            "asked the aggregator for round 2's KEYS relay, got round 3's KEYS",
        ),
        (Relay(2, Stage.SHARES, ready=True), "got round 2's SHARES"),
    ],
)
def test_a_relay_of_another_round_or_stage_is_refused(
    certs: CertsLayout, relay: Relay, says: str
) -> None:
    """A relay that is not the one asked for is a bad answer, never taken for it."""
    plan = make_plan(certs)
    with (
        relay_server(plan, RelayServicer([relay])) as port,
        client_for(plan, port) as client,
        pytest.raises(ResponseValidationError, match=re.escape(says)),
    ):
        client.get_secure_relay(2, Stage.KEYS)
