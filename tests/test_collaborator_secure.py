"""The collaborator's part in secure aggregation: its round files, its two calls, its stages.

Real parts: the round files on disk, a real gRPC server over mutual TLS with the federation's
certificates made by `pki`, and the sites' protocol (`foedus.secure.SiteRound`) behind the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from foedus.aggregator.federation import Federation
from foedus.aggregator.identity import Gatekeeper
from foedus.aggregator.records import TaskResult
from foedus.aggregator.server import add_servicer
from foedus.aggregator.servicer import AggregatorServicer
from foedus.aggregator.store import MemoryStore
from foedus.collaborator.answers import PlannedWork
from foedus.collaborator.cli import leave_reason, main
from foedus.collaborator.client import AggregatorGRPCClient, OutgoingTensor
from foedus.collaborator.digits import DigitsRunner
from foedus.collaborator.errors import ResponseValidationError
from foedus.collaborator.loop import CollaboratorReport, run_collaborator
from foedus.collaborator.secure import SecureRoundMissedError, SecureRounds, SiteIdentity
from foedus.collaborator.secure_state import RoundFile, RoundFileError, RoundFiles
from foedus.pki.layout import CertsLayout
from foedus.pki.tls import server_credentials
from foedus.plans import Plan
from foedus.plans.runners import Array
from foedus.plans.schema import (
    AGGREGATED_MODEL_VALIDATION,
    SecureAggregationSettings,
    StragglerPolicy,
    StragglerSettings,
)
from foedus.privacy.budget import training_rounds
from foedus.privacy.clipping import model_clip_factor
from foedus.privacy.noise import NoiseSecret
from foedus.privacy.shares import NoiseShares
from foedus.protos import aggregator_pb2, aggregator_pb2_grpc
from foedus.protos.channel import server_options
from foedus.secure import WEIGHT_TENSOR, ProtocolViolation, RoundContext, SealedShare, SecretKind
from foedus.secure.unmask import Unmasking
from foedus.secure.wire import (
    Post,
    Relay,
    Stage,
    post_bytes,
    post_from_proto,
    relay_from_proto,
    relay_request_from_proto,
    relay_to_proto,
)

from secure_sites import site_round
from servers import closing_rounds, make_plan, plan_document, running_aggregator

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
def relay_server(plan: Plan, servicer: aggregator_pb2_grpc.AggregatorServicer) -> Iterator[int]:
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


@contextmanager
def serving(plan: Plan, servicer: AggregatorServicer) -> Iterator[int]:
    """A real TLS server around the aggregator's own servicer (its method handlers); its port."""
    certs = plan.tls.certs
    assert certs is not None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=server_options(plan.limits.max_message_bytes),
    )
    add_servicer(servicer, server)
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


# -- one round's stages, driven by each site's SecureRounds over real gRPC ---------------------------

SETTINGS = SecureAggregationSettings(enabled=True, threshold=2, clip=1.0, bits=32, max_weight=1000)
GLOBAL = {
    "dense/weight": np.linspace(-0.5, 0.5, 12, dtype=np.float32).reshape(3, 4),
    "dense/bias": np.zeros(4, dtype=np.float32),
}
RUN_SECONDS = 60  # bound on one site's part of a round (the machine is shared and slow)


def secure_plan(certs: CertsLayout) -> Plan:
    """A TLS test plan with secure aggregation on: threshold 2 of alice, bob and carol."""
    return dataclasses.replace(make_plan(certs), secure_aggregation=SETTINGS)


def trained_by(name: str) -> dict[str, Array]:
    """What site `name` trains from GLOBAL: a delta of its own, within the clip."""
    offset = {"alice": 0.25, "bob": -0.125, "carol": 0.0625}[name]
    return {
        key: (array + offset * (1 + np.arange(array.size).reshape(array.shape) % 3)).astype(
            array.dtype
        )
        for key, array in GLOBAL.items()
    }


SAMPLES = {"alice": 30, "bob": 50, "carol": 20}


class StagesServicer(aggregator_pb2_grpc.AggregatorServicer):
    """The aggregator's part played by the test: each stage closes once every member of the one
    before has posted (KEYS: every collaborator), SURVIVORS once `uploaders` uploaded; a post
    that differs from the caller's first is FAILED_PRECONDITION. `tamper` may change a relay."""

    def __init__(
        self,
        collaborators: Sequence[str],
        uploaders: int,
        tamper: Callable[[str, Relay], Relay] | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.collaborators = tuple(sorted(collaborators))
        self.uploaders = uploaders
        self.tamper = tamper
        self.posts: dict[Stage, dict[str, Post]] = {stage: {} for stage in Stage}
        self.raw: dict[Stage, dict[str, bytes]] = {stage: {} for stage in Stage}
        self.resends = 0
        self.uploads: dict[str, dict[str, Array]] = {}

    def upload(self, name: str, tensors: Sequence[OutgoingTensor]) -> None:
        """A masked train result arrived (in the real federation: SendLocalTaskResults)."""
        with self.lock:
            self.uploads[name] = {tensor.name: np.asarray(tensor.array) for tensor in tensors}

    def members(self, stage: Stage) -> tuple[str, ...] | None:
        """Who `stage` closed with, or None while it is open."""
        if stage is Stage.KEYS:
            return self._closed(self.collaborators, Stage.KEYS)
        if stage is Stage.SHARES:
            keys = self.members(Stage.KEYS)
            return None if keys is None else self._closed(keys, Stage.SHARES)
        if stage is Stage.SURVIVORS:
            sharers = self.members(Stage.SHARES)
            if sharers is None or len(self.uploads) < self.uploaders:
                return None
            return tuple(sorted(name for name in self.uploads if name in sharers))
        survivors = self.members(Stage.SURVIVORS)  # UNMASK: once they all confirmed
        return None if survivors is None else self._closed(survivors, Stage.SURVIVORS)

    def _closed(self, awaited: tuple[str, ...], stage: Stage) -> tuple[str, ...] | None:
        return awaited if set(awaited) <= set(self.posts[stage]) else None

    def relay(self, caller: str, number: int, stage: Stage) -> Relay:
        """What the aggregator relays to `caller` of `stage` now."""
        members = self.members(stage)
        if members is None:
            return Relay(number, stage, ready=False)
        if caller not in members:
            return Relay(number, stage, ready=True, excluded=True, members=members)
        posts = self.posts
        keys = [posts[Stage.KEYS][name].keys for name in members] if stage is Stage.KEYS else []
        shares = [
            share
            for name in (members if stage is Stage.SHARES else ())
            for share in posts[Stage.SHARES][name].shares
            if share.receiver == caller
        ]
        confirmations = (
            [posts[Stage.SURVIVORS][name].confirmation for name in members]
            if stage is Stage.UNMASK
            else []
        )
        return Relay(
            number,
            stage,
            ready=True,
            members=members,
            keys=tuple(item for item in keys if item is not None),
            shares=tuple(shares),
            confirmations=tuple(item for item in confirmations if item is not None),
        )

    @staticmethod
    def _header(request_header: aggregator_pb2.MessageHeader) -> aggregator_pb2.MessageHeader:
        return RelayServicer._header(request_header)

    def PostSecureMessage(  # noqa: N802 - the RPC's name
        self, request: aggregator_pb2.SecureMessage, context: grpc.ServicerContext
    ) -> aggregator_pb2.SecureReceipt:
        caller = request.header.sender
        post = post_from_proto(request)
        data = post_bytes(post)
        with self.lock:
            first = self.raw[post.stage].setdefault(caller, data)
            if first != data:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{caller} posted another {post.stage.name}",
                )
            if caller in self.posts[post.stage]:
                self.resends += 1
            self.posts[post.stage][caller] = post
        return aggregator_pb2.SecureReceipt(header=self._header(request.header))

    def GetSecureRelay(  # noqa: N802 - the RPC's name
        self, request: aggregator_pb2.SecureRelayRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.SecureRelay:
        caller = request.header.sender
        number, stage = relay_request_from_proto(request)
        with self.lock:
            relay = self.relay(caller, number, stage)
        if self.tamper is not None:
            relay = self.tamper(caller, relay)
        return relay_to_proto(relay, self._header(request.header))

    def next_model(self, plan: Plan, round_number: int) -> dict[str, Array]:
        """The model the real aggregator would make of the survivors' uploads and revealed shares."""
        context = RoundContext(plan.federation.uuid, round_number, plan.collaborators, SETTINGS)
        survivors = self.members(Stage.SURVIVORS)
        sharers = self.members(Stage.SHARES)
        assert survivors is not None and sharers is not None
        adverts = {
            name: post.keys
            for name, post in self.posts[Stage.KEYS].items()
            if post.keys is not None
        }
        revealed = {name: post.revealed for name, post in self.posts[Stage.UNMASK].items()}
        unmasking = Unmasking.rebuild(context, adverts, sharers, survivors, revealed)
        summed: dict[str, Array] = {}
        for name in survivors:
            for key, array in self.uploads[name].items():
                summed[key] = (
                    array if key not in summed else summed[key] + array
                )  # wraps mod 2^bits
        return unmasking.next_model(GLOBAL, summed)


@contextmanager
def stages_server(plan: Plan, servicer: StagesServicer) -> Iterator[int]:
    """A real TLS server around `servicer` (the aggregator's certificate); yields its port."""
    with relay_server(plan, servicer) as port:
        yield port


def site_rounds(
    plan: Plan,
    port: int,
    name: str,
    state: Path,
    *,
    max_polls: int = 3000,
    client: AggregatorGRPCClient | None = None,
    noise_shares: NoiseShares | None = None,
) -> SecureRounds:
    """Site `name`'s SecureRounds: its own client, certificate and round files under `state`
    (with differential privacy, its `noise_shares`)."""
    certs = plan.tls.certs
    assert certs is not None
    identity = SiteIdentity.from_files(
        certs.collaborator_cert(name), certs.collaborator_key(name), certs.ca_bundle
    )
    if client is None:
        client = client_for(plan, port, name)
        client.connect()
    files = RoundFiles(state / name, plan.federation.uuid, name)
    return SecureRounds(
        client,
        plan,
        name,
        identity,
        files,
        sleep=lambda _: time.sleep(0.02),
        max_polls=max_polls,
        noise_shares=noise_shares,
    )


def run_site(
    rounds: SecureRounds,
    servicer: StagesServicer,
    name: str,
    *,
    upload: bool = True,
    round_number: int = 0,
) -> int:
    """One site's part of a round: KEYS and SHARES, its masked upload, SURVIVORS and UNMASK."""
    rounds.before_train(round_number)
    if not upload:
        return 0  # dies before its upload
    tensors, data_size = rounds.masked_results(
        round_number, GLOBAL, trained_by(name), SAMPLES[name]
    )
    servicer.upload(name, tensors)
    rounds.after_round(round_number)
    return data_size


def in_threads(jobs: Mapping[str, Callable[[], object]]) -> dict[str, object]:
    """Run each job in a thread of its own; their results (or exceptions) by name, each bounded."""
    with futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        running = {name: pool.submit(job) for name, job in jobs.items()}
        results: dict[str, object] = {}
        for name, future in running.items():
            try:
                results[name] = future.result(timeout=RUN_SECONDS)
            except Exception as error:
                results[name] = error
        return results


def weighted_mean(names: Sequence[str]) -> dict[str, Array]:
    """Plain FedAvg of the named sites' models, in float64: what the unmasked model approaches."""
    total = sum(SAMPLES[name] for name in names)
    return {
        key: sum(trained_by(name)[key].astype(np.float64) * SAMPLES[name] for name in names) / total
        for key in GLOBAL
    }


def assert_close_to(model: Mapping[str, Array], expected: Mapping[str, Array]) -> None:
    """Equal to the plain FedAvg within the quantization (and float32's) bound."""
    for key, array in expected.items():
        assert model[key].dtype == GLOBAL[key].dtype
        np.testing.assert_allclose(model[key], array, atol=1e-5)


def test_three_sites_unmask_to_the_weighted_mean(certs: CertsLayout, tmp_path: Path) -> None:
    """Three sites' masked uploads unmask to their FedAvg; each upload is ring tensors plus its
    masked weight with data size 1; the round files are erased once a later round is named."""
    plan = secure_plan(certs)
    servicer = StagesServicer(plan.collaborators, uploaders=3)
    with stages_server(plan, servicer) as port:
        sites = {name: site_rounds(plan, port, name, tmp_path) for name in plan.collaborators}
        results = in_threads(
            {
                name: functools.partial(run_site, rounds, servicer, name)
                for name, rounds in sites.items()
            }
        )
        assert results == {name: 1 for name in plan.collaborators}
        for name, upload in servicer.uploads.items():
            assert sorted(upload) == sorted([*GLOBAL, WEIGHT_TENSOR])
            assert {array.dtype for array in upload.values()} == {np.dtype(np.uint32)}
            assert not any(
                np.array_equal(upload[key].astype(np.float64), trained_by(name)[key])
                for key in GLOBAL
            )
        assert_close_to(servicer.next_model(plan, 0), weighted_mean(plan.collaborators))
        for rounds in sites.values():
            assert stat.S_IMODE(rounds.files.path(0).stat().st_mode) == 0o600
            rounds.seen(1)
            assert rounds.files.rounds() == []
            rounds.client.disconnect()


def test_a_site_dead_before_its_upload_is_unmasked_away(certs: CertsLayout, tmp_path: Path) -> None:
    """carol shares, then dies before uploading: the survivors reveal her mask key's shares and
    the model is alice's and bob's FedAvg."""
    plan = secure_plan(certs)
    servicer = StagesServicer(plan.collaborators, uploaders=2)
    with stages_server(plan, servicer) as port:
        sites = {name: site_rounds(plan, port, name, tmp_path) for name in plan.collaborators}
        results = in_threads(
            {
                name: functools.partial(run_site, rounds, servicer, name, upload=name != "carol")
                for name, rounds in sites.items()
            }
        )
        assert results == {"alice": 1, "bob": 1, "carol": 0}
        kinds = {
            share.kind
            for post in servicer.posts[Stage.UNMASK].values()
            for share in post.revealed
            if share.owner == "carol"
        }
        assert kinds == {SecretKind.MASK_PRIVATE_KEY}
        assert_close_to(servicer.next_model(plan, 0), weighted_mean(("alice", "bob")))
        for rounds in sites.values():
            rounds.client.disconnect()


def test_restarted_sites_post_the_same_bytes_and_go_on(certs: CertsLayout, tmp_path: Path) -> None:
    """alice restarts after SHARES, bob after his upload: each reads its round file, posts the
    very same bytes again (a different post would be refused) and the round unmasks as usual."""
    plan = secure_plan(certs)
    servicer = StagesServicer(plan.collaborators, uploaders=3)
    made: list[SecureRounds] = []

    def site(name: str) -> SecureRounds:
        made.append(site_rounds(plan, port, name, tmp_path))
        return made[-1]

    def alice() -> int:
        site("alice").before_train(0)
        return run_site(site("alice"), servicer, "alice")  # started again: KEYS, SHARES again

    def bob() -> int:
        first = site("bob")
        first.before_train(0)
        tensors, data_size = first.masked_results(0, GLOBAL, trained_by("bob"), SAMPLES["bob"])
        servicer.upload("bob", tensors)
        site("bob").after_round(0)  # started again, owed no task: SURVIVORS and UNMASK
        return data_size

    with stages_server(plan, servicer) as port:
        carol = site("carol")
        results = in_threads(
            {"alice": alice, "bob": bob, "carol": lambda: run_site(carol, servicer, "carol")}
        )
        assert results == {"alice": 1, "bob": 1, "carol": 1}
        assert servicer.resends == 4  # alice's KEYS and SHARES, bob's KEYS and SHARES
        assert set(servicer.posts[Stage.UNMASK]) == {"alice", "bob", "carol"}
        assert_close_to(servicer.next_model(plan, 0), weighted_mean(plan.collaborators))
        for rounds in made:
            rounds.client.disconnect()


def swap_bobs_mask_key_for(victim: str) -> Callable[[str, Relay], Relay]:
    """A malicious aggregator: the KEYS relay to `victim` carries bob's keys with carol's mask key."""

    def tamper(caller: str, relay: Relay) -> Relay:
        if caller != victim or relay.stage is not Stage.KEYS or not relay.ready:
            return relay
        by_name = {advert.collaborator: advert for advert in relay.keys}
        swapped = dataclasses.replace(by_name["bob"], mask_key=by_name["carol"].mask_key)
        keys = tuple(swapped if advert.collaborator == "bob" else advert for advert in relay.keys)
        return dataclasses.replace(relay, keys=keys)

    return tamper


def survivors_below_the_threshold(caller: str, relay: Relay) -> Relay:
    """A malicious aggregator: the SURVIVORS relay names alice alone (the threshold is 2)."""
    if relay.stage is Stage.SURVIVORS and relay.ready:
        return dataclasses.replace(relay, members=("alice",))
    return relay


@dataclasses.dataclass(frozen=True)
class Attack:
    """A malicious aggregator's relay, what alice raises, its words and the stage she stops at."""

    tamper: Callable[[str, Relay], Relay]
    refusal: type[Exception]
    says: str
    stage: Stage


ATTACKS = {
    "swapped key": Attack(
        swap_bobs_mask_key_for("alice"), ProtocolViolation, "site 'bob'", Stage.KEYS
    ),
    "survivors below the threshold": Attack(
        survivors_below_the_threshold,
        SecureRoundMissedError,
        "below the threshold 2: nothing is revealed; waiting for the next round",
        Stage.SURVIVORS,
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_malicious_aggregator_gets_a_violation_and_nothing_revealed(
    certs: CertsLayout, tmp_path: Path, attack: str
) -> None:
    """A swapped key (a violation: the site leaves) or a survivor list below the threshold (it
    waits for the next round: the others may have left): alice refuses with one line naming what
    failed, and posts nothing after it (no share, no confirmation)."""
    tamper, refusal, says, stage = dataclasses.astuple(ATTACKS[attack])
    plan = secure_plan(certs)
    servicer = StagesServicer(plan.collaborators, uploaders=3, tamper=tamper)
    with stages_server(plan, servicer) as port:
        # Without alice's SHARES the others wait for nothing: they give up after a few polls.
        polls = 50 if stage is Stage.KEYS else 3000
        sites = {
            name: site_rounds(plan, port, name, tmp_path, max_polls=polls)
            for name in plan.collaborators
        }
        alice = in_threads(
            {name: functools.partial(run_site, sites[name], servicer, name) for name in sites}
        )["alice"]
        assert type(alice) is refusal
        message = str(alice)
        assert says in message and "\n" not in message
        after = [later for later in Stage if later > stage]
        assert not [later for later in after if "alice" in servicer.posts[later]]
        for rounds in sites.values():
            rounds.client.disconnect()


def posted_by(servicer: StagesServicer, name: str) -> list[str]:
    """The stages `name` posted to, and "upload" when its masked update arrived."""
    stages = [stage.name for stage in Stage if name in servicer.posts[stage]]
    return [*stages, "upload"] if name in servicer.uploads else stages


def assert_one_line(error: object, kind: type[Exception], *says: str) -> None:
    """`error` is a `kind` whose one-line message says each of `says`."""
    assert type(error) is kind, error
    message = str(error)
    assert "\n" not in message and all(part in message for part in says), message


def test_an_earlier_rounds_keys_replayed_are_refused(certs: CertsLayout, tmp_path: Path) -> None:
    """In round 1 the aggregator relays to alice bob's genuine keys of round 0 (his certificate's
    signature, his name): alice refuses with one line naming bob and posts no shares; bob and
    carol, whose SHARES stage never closes without her, give the round up within their bound."""
    plan = secure_plan(certs)
    earlier = RoundContext(plan.federation.uuid, 0, plan.collaborators, SETTINGS)
    replayed = site_round(certs, earlier, "bob").advertisement()

    def replay(caller: str, relay: Relay) -> Relay:
        if caller != "alice" or relay.stage is not Stage.KEYS or not relay.ready:
            return relay
        keys = tuple(replayed if key.collaborator == "bob" else key for key in relay.keys)
        return dataclasses.replace(relay, keys=keys)

    servicer = StagesServicer(plan.collaborators, uploaders=3, tamper=replay)
    with stages_server(plan, servicer) as port:
        sites = {
            name: site_rounds(plan, port, name, tmp_path, max_polls=50)
            for name in plan.collaborators
        }
        results = in_threads(
            {
                name: functools.partial(run_site, rounds, servicer, name, round_number=1)
                for name, rounds in sites.items()
            }
        )
        for rounds in sites.values():
            rounds.client.disconnect()
    assert_one_line(results["alice"], ProtocolViolation, "site 'bob'")
    assert posted_by(servicer, "alice") == ["KEYS"]
    for name in ("bob", "carol"):
        assert_one_line(results[name], SecureRoundMissedError, "SHARES stage stayed open")


def test_a_share_sealed_for_another_site_is_refused_and_the_others_go_on(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """The SHARES relay to alice carries carol's share sealed for bob in place of hers: alice
    refuses with one line, uploads and reveals nothing; bob and carol, at the threshold, finish
    the round (alice's masks removed with her mask key's shares) at their own FedAvg."""
    plan = secure_plan(certs)

    def misdeliver(caller: str, relay: Relay) -> Relay:
        if caller != "alice" or relay.stage is not Stage.SHARES or not relay.ready:
            return relay
        (for_bob,) = [
            s for s in servicer.posts[Stage.SHARES]["carol"].shares if s.receiver == "bob"
        ]
        shares = tuple(for_bob if share.sender == "carol" else share for share in relay.shares)
        return dataclasses.replace(relay, shares=shares)

    servicer = StagesServicer(plan.collaborators, uploaders=2, tamper=misdeliver)
    with stages_server(plan, servicer) as port:
        sites = {name: site_rounds(plan, port, name, tmp_path) for name in plan.collaborators}
        results = in_threads(
            {name: functools.partial(run_site, sites[name], servicer, name) for name in sites}
        )
        for rounds in sites.values():
            rounds.client.disconnect()
    assert_one_line(results["alice"], ProtocolViolation, "carol", "bob")
    assert posted_by(servicer, "alice") == ["KEYS", "SHARES"]
    assert results["bob"] == results["carol"] == 1
    revealed = {
        share.kind
        for post in servicer.posts[Stage.UNMASK].values()
        for share in post.revealed
        if share.owner == "alice"
    }
    assert revealed == {SecretKind.MASK_PRIVATE_KEY}
    assert_close_to(servicer.next_model(plan, 0), weighted_mean(("bob", "carol")))


def test_a_dropped_sites_seed_asked_for_is_refused(certs: CertsLayout, tmp_path: Path) -> None:
    """carol dies before her upload; the aggregator names her a survivor to alice only (her
    seed's share, with carol's mask key's share from bob, would unmask an upload of hers):
    alice confirms that list, but bob's signature is over another, so fewer than the threshold
    confirmed hers. She refuses with one line and reveals nothing; so does bob (alice's
    signature is not over his list): the aggregator gets no share of anyone's."""
    plan = secure_plan(certs)

    def carol_survived(caller: str, relay: Relay) -> Relay:
        if caller == "alice" and relay.stage is Stage.SURVIVORS and relay.ready:
            return dataclasses.replace(relay, members=("alice", "bob", "carol"))
        return relay

    servicer = StagesServicer(plan.collaborators, uploaders=2, tamper=carol_survived)
    with stages_server(plan, servicer) as port:
        sites = {name: site_rounds(plan, port, name, tmp_path) for name in plan.collaborators}
        results = in_threads(
            {
                name: functools.partial(run_site, rounds, servicer, name, upload=name != "carol")
                for name, rounds in sites.items()
            }
        )
        for rounds in sites.values():
            rounds.client.disconnect()
    assert_one_line(
        results["alice"],
        ProtocolViolation,
        "1 valid confirmations of survivors ['alice', 'bob', 'carol'], fewer than the 2 needed",
        "nothing is revealed",
    )
    assert_one_line(results["bob"], ProtocolViolation, "survivors ['alice', 'bob']")
    assert servicer.posts[Stage.UNMASK] == {}
    assert sorted(servicer.posts[Stage.SURVIVORS]) == ["alice", "bob"]


def test_a_stage_closed_without_the_site_is_a_missed_round(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """KEYS closed with alice and bob only: carol's part in the round ends there, nothing masked."""
    plan = secure_plan(certs)
    servicer = StagesServicer(("alice", "bob"), uploaders=2)
    with stages_server(plan, servicer) as port:
        carol = site_rounds(plan, port, "carol", tmp_path)
        others = {name: site_rounds(plan, port, name, tmp_path) for name in ("alice", "bob")}
        results = in_threads(
            {
                **{
                    name: functools.partial(run_site, rounds, servicer, name)
                    for name, rounds in others.items()
                },
                "carol": lambda: carol.before_train(0),
            }
        )
        assert isinstance(results["carol"], SecureRoundMissedError)
        assert (
            str(results["carol"])
            == "round 0's KEYS stage closed without this collaborator; the round goes on without it"
        )
        assert_close_to(servicer.next_model(plan, 0), weighted_mean(("alice", "bob")))
        for rounds in [carol, *others.values()]:
            rounds.client.disconnect()


# -- whole secure federations: the real aggregator, the collaborators' real loops -------------------

DIGITS_SETTINGS = SecureAggregationSettings(
    enabled=True, threshold=2, clip=1.0, bits=32, max_weight=1000
)


def digits_plan(certs: CertsLayout, *, secure: bool) -> Plan:
    """The digits federation of alice, bob and carol (2 rounds), secure or plain; relays and
    GetTasks long-poll briefly."""
    plan = make_plan(certs, aggregator={"long_poll_seconds": 0.2})
    settings = DIGITS_SETTINGS if secure else SecureAggregationSettings()
    return dataclasses.replace(plan, secure_aggregation=settings)


def run_in_process(
    plan: Plan, state: Path, site_secrets: Mapping[str, NoiseSecret] | None = None
) -> dict[str, Array]:
    """Run `plan`'s whole federation in this process (a real server, each collaborator's loop in
    a thread of its own; with differential privacy, each site's noise shares from its secret in
    `site_secrets`); the final model."""
    federation = Federation.from_plan(plan, DigitsRunner.initial_model(plan.runner))
    planned = PlannedWork(rounds=plan.federation.rounds, tasks=plan.tasks)

    def collaborator(name: str, port: int) -> CollaboratorReport:
        client = client_for(plan, port, name)
        with client:
            secure = None
            if plan.secure_aggregation.enabled:
                shares = None if site_secrets is None else NoiseShares.of(plan, site_secrets[name])
                secure = site_rounds(plan, port, name, state, client=client, noise_shares=shares)
            runner = DigitsRunner(plan.runner, collaborator=name, collaborators=plan.collaborators)
            return run_collaborator(
                client, runner, plan.runner, planned=planned, secure=secure, max_idle_polls=400
            )

    with running_aggregator(plan, federation) as server, closing_rounds(federation):
        reports = in_threads(
            {
                name: functools.partial(collaborator, name, server.port)
                for name in plan.collaborators
            }
        )
    for name, report in reports.items():
        assert isinstance(report, CollaboratorReport), (name, report)
        assert report.quit and report.missed_rounds == [], (name, report)
    assert federation.finished
    return {name: np.array(array) for name, array in federation.model().items()}


def test_a_secure_federation_ends_close_to_the_plain_one(
    certs: CertsLayout, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The digits federation run securely (every round unmasked with all three sites) ends within
    the quantization of the plain run's model (measured: 3e-8 at most), every round file gone."""
    caplog.set_level(logging.INFO, logger="foedus.collaborator.secure")
    secure = run_in_process(digits_plan(certs, secure=True), tmp_path / "secure")
    revealed = [line for line in caplog.messages if "shares revealed for the unmasking" in line]
    assert len(revealed) == 3 * 2  # each site, each training round
    plain = run_in_process(digits_plan(certs, secure=False), tmp_path / "plain")
    assert sorted(secure) == sorted(plain)
    for name, array in plain.items():
        assert secure[name].dtype == array.dtype
        np.testing.assert_allclose(secure[name], array, rtol=0, atol=1e-6)
    assert [path for path in (tmp_path / "secure").rglob("*") if path.is_file()] == []


def test_a_private_secure_federation_ends_at_its_budget_with_the_sites_noise(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """Secure aggregation with differential privacy through a real aggregator: the budget allows
    1 of the plan's 2 rounds, and the final model is the initial one plus the mean of the
    sites' clipped deltas and noise shares (the test knows each site's secret), within the
    fixed point's rounding; the aggregator adds no noise of its own."""
    plan = make_plan(
        certs,
        aggregator={"long_poll_seconds": 0.2},
        secure_aggregation={"enabled": True, "threshold": 2},
        differential_privacy={
            "enabled": True,
            "clip": 1.0,
            "noise_multiplier": 1.0,
            "max_epsilon": 5,  # one round spends 4.73 at delta 1e-5, two 7.0
        },
    )
    assert training_rounds(plan) == 1 < plan.federation.rounds
    site_secrets = {
        name: NoiseSecret(bytes([index]) * 32) for index, name in enumerate(plan.collaborators)
    }
    final = run_in_process(plan, tmp_path, site_secrets)
    initial = DigitsRunner.initial_model(plan.runner)
    summed = {key: np.zeros(array.size) for key, array in initial.items()}
    noiseless = {key: np.zeros(array.size) for key, array in initial.items()}
    for name in plan.collaborators:
        runner = DigitsRunner(plan.runner, collaborator=name, collaborators=plan.collaborators)
        trained = runner.train(initial, 0).model
        factor = model_clip_factor(initial, trained, 1.0)
        shares = NoiseShares.of(plan, site_secrets[name])
        assert shares is not None and shares.quorum == 2
        noise = shares.noise(0)
        for key, array in initial.items():
            delta = trained[key].astype(np.float64) - array.astype(np.float64)
            noiseless[key] += factor * delta.reshape(-1)
            summed[key] += factor * delta.reshape(-1) + noise(key, 0, array.size)
    for key, array in initial.items():
        expected = array.astype(np.float64) + (summed[key] / 3).reshape(array.shape)
        assert final[key].dtype == array.dtype
        np.testing.assert_allclose(final[key], expected, rtol=0, atol=1e-5)
        # The noise is there: std 1 x 1 / sqrt(2) per site, over 3 sites, 0.41 on the mean.
        moved = final[key].reshape(-1) - array.reshape(-1) - noiseless[key] / 3
        assert 0.3 < float(np.std(moved)) < 0.5, key


# -- collaborator start ------------------------------------------------------------------------------


class SwapsKeysFor(AggregatorServicer):
    """The real servicer over a real secure federation, except that the KEYS relay to `victim`
    carries bob's keys with carol's mask key (a key swapped by a malicious aggregator)."""

    def __init__(self, plan: Plan, federation: Federation, victim: str) -> None:
        gatekeeper = Gatekeeper(
            aggregator_id=plan.federation.aggregator_id,
            federation_uuid=plan.federation.uuid,
            collaborators=frozenset(plan.collaborators),
            tls=True,
        )
        super().__init__(
            federation, gatekeeper, plan.limits, long_poll_seconds=0.2, max_long_polls=8
        )
        self.tamper = swap_bobs_mask_key_for(victim)

    def GetSecureRelay(  # noqa: N802 - the RPC's name
        self, request: aggregator_pb2.SecureRelayRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.SecureRelay:
        response = super().GetSecureRelay(request, context)
        relay = self.tamper(request.header.sender, relay_from_proto(response))
        return relay_to_proto(relay, response.header)


def secure_plan_file(folder: Path, certs: CertsLayout, port: int, **sections: Any) -> Path:
    """A secure digits plan for the server at 127.0.0.1:`port`, written to folder/plan.yaml."""
    document = plan_document(
        certs,
        aggregator={"host": "127.0.0.1", "common_name": "localhost", "port": port},
        secure_aggregation={"enabled": True, "threshold": 2, "clip": 1.0, "max_weight": 1000},
        **sections,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def run_main_bounded(argv: list[str]) -> int:
    """`collaborator` main(argv) in a thread, failing the test if it runs past RUN_SECONDS."""
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    thread.join(RUN_SECONDS)
    assert not thread.is_alive(), f"the collaborator still runs after {RUN_SECONDS} s"
    return codes[0]


def test_a_swapped_key_ends_collaborator_start_with_one_line_and_a_leave(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """alice, relayed a swapped key, exits 1 with one line naming bob and what failed, having
    told the aggregator she leaves; bob and carol, above the threshold, finish the federation.
    alice's round file is in the default state folder, private."""
    plan = dataclasses.replace(make_plan(certs), secure_aggregation=DIGITS_SETTINGS)
    federation = Federation.from_plan(plan, DigitsRunner.initial_model(plan.runner))
    servicer = SwapsKeysFor(plan, federation, "alice")
    with serving(plan, servicer) as port, closing_rounds(federation):
        path = secure_plan_file(tmp_path / "alice", certs, port)
        others = in_threads_started(
            {
                name: functools.partial(loop_of, plan, port, name, tmp_path)
                for name in ("bob", "carol")
            }
        )
        code = run_main_bounded(["start", "-n", "alice", "--plan", str(path)])
        reports = {name: future.result(timeout=RUN_SECONDS) for name, future in others.items()}
    assert code == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("collaborator: error: ")]
    assert "site 'bob'" in line and "Traceback" not in err
    assert federation.liveness.has_left("alice")
    assert all(report.quit for report in reports.values()), reports
    assert federation.finished
    folder = tmp_path / "alice" / "collaborator-state" / "alice"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()] == [0o600]


def test_keep_metrics_sends_none_and_logs_them_at_the_site(
    certs: CertsLayout,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """alice runs `collaborator start --keep-metrics`: her results carry no metric and a
    data_size of 1, yet she counts in every round; the rounds' means are bob's and carol's and
    their rows leave her out; her own log has her metrics as any site's."""
    plan = dataclasses.replace(make_plan(certs), secure_aggregation=DIGITS_SETTINGS)
    federation = Federation.from_plan(plan, DigitsRunner.initial_model(plan.runner))
    sent: list[tuple[str, int, int]] = []  # alice's results: task, data_size, metrics
    submit = federation.submit

    def noting(result: TaskResult) -> bool:
        if result.collaborator == "alice":
            metrics = sum("metric" in tensor.tags for tensor in result.tensors)
            sent.append((result.task_name, result.data_size, metrics))
        return submit(result)

    monkeypatch.setattr(federation, "submit", noting)
    caplog.set_level(logging.INFO, logger="foedus.collaborator")
    with running_aggregator(plan, federation) as server, closing_rounds(federation):
        path = secure_plan_file(tmp_path / "alice", certs, server.port)
        others = in_threads_started(
            {
                name: functools.partial(loop_of, plan, server.port, name, tmp_path)
                for name in ("bob", "carol")
            }
        )
        code = run_main_bounded(["start", "-n", "alice", "--plan", str(path), "--keep-metrics"])
        reports = {name: future.result(timeout=RUN_SECONDS) for name, future in others.items()}
    assert code == 0, capsys.readouterr().err
    assert all(report.quit and not report.missed_rounds for report in reports.values()), reports
    assert federation.finished
    store = federation.store
    assert isinstance(store, MemoryStore)
    records = store.closed
    assert len(records) == plan.federation.rounds + 1  # and the final validation
    for record in records:
        assert record.reporters == ("alice", "bob", "carol") and record.untrained == ""
        assert sorted(record.sites) == ["bob", "carol"], record.sites
        assert record.metrics[AGGREGATED_MODEL_VALIDATION]["accuracy"] > 0
    assert len(sent) == 3 * plan.federation.rounds + 1, sent  # and the final validation
    assert {(data_size, metrics) for _, data_size, metrics in sent} == {(1, 0)}, sent
    said = "this site keeps its metrics: its results carry none (--keep-metrics)"
    alices = [  # her main() runs in a thread of its own, bob and carol in theirs
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("foedus.collaborator") and r.threadName not in ("bob", "carol")
    ]
    assert said in alices
    validated = [m for m in alices if re.match(r"round \d: aggregated_model_validation on", m)]
    assert len(validated) == len(records) and all("accuracy=" in m for m in validated)


def loop_of(plan: Plan, port: int, name: str, state: Path) -> CollaboratorReport:
    """`name`'s collaborator loop with its secure rounds, bounded, until the federation is done."""
    client = client_for(plan, port, name)
    with client:
        secure = site_rounds(plan, port, name, state, client=client)
        runner = DigitsRunner(plan.runner, collaborator=name, collaborators=plan.collaborators)
        planned = PlannedWork(rounds=plan.federation.rounds, tasks=plan.tasks)
        return run_collaborator(
            client, runner, plan.runner, planned=planned, secure=secure, max_idle_polls=400
        )


def in_threads_started(
    jobs: Mapping[str, Callable[[], CollaboratorReport]],
) -> dict[str, futures.Future[CollaboratorReport]]:
    """Start each job in a thread of its own (daemon threads: a stuck one cannot hang the run)."""
    started: dict[str, futures.Future[CollaboratorReport]] = {}
    for name, job in jobs.items():
        future: futures.Future[CollaboratorReport] = futures.Future()

        def work(
            job: Callable[[], CollaboratorReport] = job,
            future: futures.Future[CollaboratorReport] = future,
        ) -> None:
            try:
                future.set_result(job())
            except BaseException as error:  # handed to the test
                future.set_exception(error)

        threading.Thread(target=work, name=name, daemon=True).start()
        started[name] = future
    return started


def test_secure_aggregation_without_certificates_is_refused_at_start(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secure plan with tls.insecure stops collaborator start with one line, exit 2."""
    path = secure_plan_file(tmp_path, certs, 50999)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    document["tls"] = {"insecure": True}
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    assert main(["start", "-n", "alice", "--plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "secure_aggregation.enabled needs the federation's certificates" in err


def test_help_says_what_the_state_folder_holds(capsys: pytest.CaptureFixture[str]) -> None:
    """collaborator start --help names --state-dir, what it keeps and its default."""
    assert main(["start", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--state-dir DIR" in text
    assert "one file per round, mode 0600" in text
    assert "default: the plan's folder/collaborator-state/NAME" in text


def test_a_protocol_violation_leaves_with_a_category_never_its_text() -> None:
    """The Leave of a site that refused the protocol says so, without the violation's words."""
    error = ProtocolViolation("site 'bob': its advertised keys are not signed by its certificate")
    assert leave_reason(error) == "a secure aggregation protocol violation (ProtocolViolation)"


class LateKeys(AggregatorGRPCClient):
    """carol's client: her first post (round 0's keys) goes only once the KEYS stage has closed
    without her, as a site too slow for the plan's cut-off."""

    late = True

    def post_secure_message(self, post: Post) -> None:
        """Wait for KEYS to close (its relay says she is left out), then post."""
        if self.late:
            self.late = False
            for _ in range(int(RUN_SECONDS / 0.05)):
                if self.get_secure_relay(post.round_number, Stage.KEYS).ready:
                    break
                time.sleep(0.05)
        super().post_secure_message(post)


def test_a_site_left_out_of_a_round_sits_it_out_and_takes_the_next(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """carol posts her keys after round 0's KEYS closed by the cut-off: refused, she sits the
    round out (its tasks are still offered to her) while alice and bob finish it, and she takes
    part in round 1; everyone is told the federation finished."""
    plan = dataclasses.replace(
        make_plan(certs, aggregator={"long_poll_seconds": 0.2}),
        secure_aggregation=DIGITS_SETTINGS,
        straggler=StragglerSettings(policy=StragglerPolicy.CUTOFF, cutoff_seconds=1, min_reports=2),
    )
    federation = Federation.from_plan(plan, DigitsRunner.initial_model(plan.runner))
    planned = PlannedWork(rounds=plan.federation.rounds, tasks=plan.tasks)

    def collaborator(name: str, port: int) -> CollaboratorReport:
        kind = LateKeys if name == "carol" else AggregatorGRPCClient
        client = kind.from_plan(
            plan, name, aggregator_address="127.0.0.1", aggregator_port=port, sleep=lambda _: None
        )
        with client:
            secure = site_rounds(plan, port, name, tmp_path, client=client)
            runner = DigitsRunner(plan.runner, collaborator=name, collaborators=plan.collaborators)
            return run_collaborator(
                client,
                runner,
                plan.runner,
                planned=planned,
                secure=secure,
                sleep=lambda _: time.sleep(0.05),
                max_idle_polls=2000,
            )

    with running_aggregator(plan, federation) as server, closing_rounds(federation):
        reports = in_threads(
            {
                name: functools.partial(collaborator, name, server.port)
                for name in plan.collaborators
            }
        )
    carol = reports["carol"]
    assert isinstance(carol, CollaboratorReport), carol
    assert carol.quit and carol.missed_rounds == [0] and carol.rounds == [0, 1, 2]
    for name in ("alice", "bob"):
        report = reports[name]
        assert isinstance(report, CollaboratorReport), report
        assert report.quit and report.missed_rounds == [], report
    assert federation.finished


def test_a_state_dir_that_is_a_file_is_refused_at_start(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--state-dir naming a file stops collaborator start with one line naming it, exit 2, the
    file untouched."""
    path = secure_plan_file(tmp_path, certs, 50999)
    taken = tmp_path / "taken"
    taken.write_text("someone's file", encoding="utf-8")
    taken.chmod(0o644)
    code = main(["start", "-n", "alice", "--plan", str(path), "--state-dir", str(taken)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"collaborator: error: --state-dir: {taken}: cannot keep secure round files there: "
        "not a folder"
    )
    assert stat.S_IMODE(taken.stat().st_mode) == 0o644


def test_the_state_dir_is_made_private_at_start(tmp_path: Path) -> None:
    """RoundFiles.prepare makes the folder, parents and all, mode 0700 (a wider one narrowed)."""
    folder = tmp_path / "a" / "b"
    RoundFiles(folder, UUID, "alice").prepare()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o755)
    RoundFiles(folder, UUID, "alice").prepare()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_restarted_site_keeps_to_the_survivor_list_it_signed(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """carol drops before her upload; alice signs the survivors alice and bob and reveals carol's
    mask key's share. Started again, alice is relayed survivors with carol among them (her
    seed's share would then unmask carol): her round file says what she signed, so she refuses,
    with one line, and posts nothing new."""
    plan = secure_plan(certs)
    servicer = StagesServicer(plan.collaborators, uploaders=2)
    with stages_server(plan, servicer) as port:
        sites = {name: site_rounds(plan, port, name, tmp_path) for name in plan.collaborators}
        results = in_threads(
            {
                name: functools.partial(run_site, rounds, servicer, name, upload=name != "carol")
                for name, rounds in sites.items()
            }
        )
        assert results == {"alice": 1, "bob": 1, "carol": 0}
        posted = dict(servicer.raw[Stage.UNMASK])

        def with_carol(caller: str, relay: Relay) -> Relay:
            if relay.stage is Stage.SURVIVORS and relay.ready:
                return dataclasses.replace(relay, members=("alice", "bob", "carol"))
            return relay

        servicer.tamper = with_carol
        again = site_rounds(plan, port, "alice", tmp_path)
        with pytest.raises(ProtocolViolation) as raised:
            again.after_round(0)
        assert "after this site confirmed ['alice', 'bob']" in str(raised.value)
        assert servicer.raw[Stage.UNMASK] == posted
        for rounds in [*sites.values(), again]:
            rounds.client.disconnect()
