"""Secure aggregation's two RPCs on a live aggregator over real mutual TLS: honest posts and
relays (a relay is a long poll), and hostile posts, each answered with its exact status and a
message that says what is wrong."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from foedus.aggregator.checks import PLAINTEXT_REFUSED
from foedus.aggregator.federation import Federation
from foedus.aggregator.server import AggregatorGRPCServer
from foedus.pki.layout import CertsLayout
from foedus.plans import Plan
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import encode_tensor
from foedus.protos.stream import task_results_to_chunks
from foedus.secure import SealedShare
from foedus.secure.wire import Post, Stage, post_to_proto, relay_from_proto, relay_request_to_proto

from conftest import Identity
from secure_sites import SETTINGS, Sites
from servers import FEDERATION_UUID, make_plan, running_aggregator, small_model
from test_server import Caller, connect

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DENIED = grpc.StatusCode.PERMISSION_DENIED
LONG_POLL_SECONDS = 2.0


@dataclasses.dataclass
class World:
    """A live secure aggregator, its federation, a caller per collaborator, their honest sites."""

    plan: Plan
    federation: Federation
    server: AggregatorGRPCServer
    callers: dict[str, Caller]
    sites: Sites


def secure_plan(certs: CertsLayout) -> Plan:
    """The test federation with secure aggregation on and relays that wait a little."""
    plan = make_plan(certs, aggregator={"long_poll_seconds": LONG_POLL_SECONDS})
    return dataclasses.replace(plan, secure_aggregation=SETTINGS)


@pytest.fixture
def world(certs: CertsLayout) -> Iterator[World]:
    """A fresh secure aggregator for each test, and callers for alice, bob and carol."""
    plan = secure_plan(certs)
    federation = Federation.from_plan(plan, small_model())
    with running_aggregator(plan, federation) as server:
        callers = {
            name: connect(
                server,
                certs,
                Identity(certs.collaborator_cert(name), certs.collaborator_key(name)),
                name,
            )
            for name in plan.collaborators
        }
        sites = Sites.of(federation, certs, plan.collaborators, uuid=FEDERATION_UUID)
        try:
            yield World(plan, federation, server, callers, sites)
        finally:
            for caller in callers.values():
                caller.channel.close()


def status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status a call was answered with, and its message."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return OK, ""


def send(caller: Caller, post: Post, **header: str) -> Callable[[], object]:
    """A `PostSecureMessage` of `post` from `caller`, to be made."""
    message = post_to_proto(post, caller.header(**header))
    return lambda: caller.stub.PostSecureMessage(message, timeout=10)


def keys(world: World, name: str, **changes: Any) -> Post:
    """`name`'s honest keys of round 0, with `changes`."""
    advertisement = world.sites.rounds[name].advertisement()
    return Post(0, Stage.KEYS, keys=dataclasses.replace(advertisement, **changes))


def relay(caller: Caller, stage: Stage, round_number: int = 0) -> aggregator_pb2.SecureRelay:
    """`caller`'s `GetSecureRelay` of `stage`."""
    request = relay_request_to_proto(round_number, stage, caller.header())
    reply: aggregator_pb2.SecureRelay = caller.stub.GetSecureRelay(request, timeout=10)
    return reply


def test_posts_are_acknowledged_once_and_the_relay_waits_for_the_close(world: World) -> None:
    """alice's keys are taken, her resend answered OK; carol's relay waits (a long poll) and
    is answered as soon as the last keys close the stage."""
    alice, bob, carol = (world.callers[name] for name in ("alice", "bob", "carol"))
    assert status(send(alice, keys(world, "alice"))) == (OK, "")
    assert status(send(alice, keys(world, "alice"))) == (OK, "")
    waiting = relay(carol, Stage.KEYS)
    assert not waiting.ready  # answered after the long poll: nothing yet
    answer: list[aggregator_pb2.SecureRelay] = []
    poll = threading.Thread(target=lambda: answer.append(relay(carol, Stage.KEYS)))
    poll.start()
    assert status(send(bob, keys(world, "bob"))) == (OK, "")
    assert status(send(carol, keys(world, "carol"))) == (OK, "")
    poll.join(timeout=10)
    assert not poll.is_alive()
    got = relay_from_proto(answer[0])
    assert got.ready and not got.excluded and got.members == ("alice", "bob", "carol")
    assert [k.collaborator for k in got.keys] == ["alice", "bob", "carol"]
    assert answer[0].header.receiver == "carol"
    assert got.keys[0] == world.sites.rounds["alice"].advertisement()


@pytest.mark.parametrize(
    ("make", "code", "phrase"),
    [
        (
            lambda w, c: send(c, keys(w, "alice", collaborator="bob")),
            INVALID,
            "the keys are advertised as 'bob''s; alice advertises its own",
        ),
        (
            lambda w, c: send(c, keys(w, "alice", mask_key=b"\0" * 16)),
            INVALID,
            "mask_key is 16 bytes long, not 32",
        ),
        (
            lambda w, c: send(c, keys(w, "alice", encryption_key=b"\1" * 32)),
            INVALID,
            "signature is not its certificate's",
        ),
        (
            lambda w, c: send(c, keys(w, "bob")),  # bob's keys sent by alice
            INVALID,
            "the keys are advertised as 'bob''s",
        ),
        (
            lambda w, c: (
                lambda: c.stub.PostSecureMessage(
                    aggregator_pb2.SecureMessage(header=c.header(), round_number=0), timeout=10
                )
            ),
            INVALID,
            "stage 0 is not a secure stage",
        ),
        (
            lambda w, c: (
                lambda: c.stub.PostSecureMessage(
                    aggregator_pb2.SecureMessage(
                        header=c.header(), round_number=0, stage=aggregator_pb2.SECURE_KEYS
                    ),
                    timeout=10,
                )
            ),
            INVALID,
            "a KEYS message without its keys",
        ),
        (
            lambda w, c: (
                lambda: c.stub.PostSecureMessage(
                    aggregator_pb2.SecureMessage(
                        header=c.header(),
                        round_number=0,
                        stage=aggregator_pb2.SECURE_KEYS,
                        keys=post_to_proto(keys(w, "alice")).keys,
                        shares=[aggregator_pb2.SealedShare(sender="alice", receiver="bob")],
                    ),
                    timeout=10,
                )
            ),
            INVALID,
            "a KEYS message carries the field(s) of SHARES too",
        ),
        (
            lambda w, c: send(c, dataclasses.replace(keys(w, "alice"), round_number=3)),
            PRECONDITION,
            "round 3 is not the round in progress (0)",
        ),
        (
            lambda w, c: send(c, keys(w, "bob"), sender="bob"),  # alice's certificate, bob's name
            DENIED,
            "",
        ),
        (
            lambda w, c: send(
                c,
                Post(0, Stage.SHARES, shares=(SealedShare("alice", "alice", b"x" * 100),)),
            ),
            PRECONDITION,
            "round 0's KEYS stage's members are not known yet",
        ),
    ],
    ids=[
        "keys-of-another-name",
        "short-key",
        "swapped-key",
        "bobs-keys",
        "no-stage",
        "no-keys",
        "two-stages",
        "another-round",
        "impersonation",
        "shares-too-early",
    ],
)
def test_hostile_posts_get_their_exact_status(
    world: World,
    make: Callable[[World, Caller], Callable[[], object]],
    code: grpc.StatusCode,
    phrase: str,
) -> None:
    """Each hostile post is refused with its status and a message naming what is wrong;
    nothing is kept, and alice's honest keys are taken after it."""
    alice = world.callers["alice"]
    got, details = status(make(world, alice))
    assert got is code, details
    assert phrase in details
    assert world.federation.secure is not None
    assert status(send(alice, keys(world, "alice"))) == (OK, "")


def test_a_different_second_post_and_a_closed_stage_are_refused(world: World) -> None:
    """A second, different post: FAILED_PRECONDITION; a post to a stage closed without the
    caller too, and its relay says it is excluded."""
    alice, bob, carol = (world.callers[name] for name in ("alice", "bob", "carol"))
    assert status(send(alice, keys(world, "alice"))) == (OK, "")
    other = Sites.of(world.federation, world.sites.certs, ["alice"], uuid=FEDERATION_UUID)
    code, details = status(
        send(alice, Post(0, Stage.KEYS, keys=other.rounds["alice"].advertisement()))
    )
    assert (code, details) == (
        PRECONDITION,
        "alice already posted a different KEYS message in round 0; a stage takes one post per site",
    )
    assert status(
        lambda: carol.stub.Leave(
            aggregator_pb2.LeaveRequest(header=carol.header(), reason="test"), timeout=10
        )
    ) == (OK, "")
    assert status(send(bob, keys(world, "bob"))) == (OK, "")
    assert relay_from_proto(relay(alice, Stage.KEYS)).members == ("alice", "bob")
    code, details = status(send(carol, keys(world, "carol")))
    assert code is PRECONDITION
    assert details.startswith("round 0's KEYS stage closed without carol")
    excluded = relay_from_proto(relay(carol, Stage.KEYS))
    assert excluded.ready and excluded.excluded and excluded.keys == ()


def test_relays_of_other_rounds_or_no_stage_are_refused(world: World) -> None:
    """A relay of a round not in progress, or of no stage: refused with its status."""
    alice = world.callers["alice"]
    code, details = status(lambda: relay(alice, Stage.KEYS, round_number=1))
    assert (code, details) == (PRECONDITION, "round 1 is not the round in progress (0)")
    request = aggregator_pb2.SecureRelayRequest(header=alice.header(), round_number=0)
    code, details = status(lambda: alice.stub.GetSecureRelay(request, timeout=10))
    assert code is INVALID and "stage 0 is not a secure stage" in details


def test_a_plaintext_upload_is_refused_saying_why(world: World) -> None:
    """An OpenFL-style upload (float tensors, its sample count) in a secure round:
    INVALID_ARGUMENT naming the README section; nothing kept."""
    alice = world.callers["alice"]
    code, details = status(lambda: alice.send(task_results_to_chunks(alice.results())))
    assert code is INVALID
    assert details.endswith(PLAINTEXT_REFUSED)
    assert world.federation.accepted() == ()


def test_a_plain_federation_refuses_secure_posts(certs: CertsLayout) -> None:
    """Without secure aggregation in the plan, a post is FAILED_PRECONDITION saying so."""
    plan = make_plan(certs)
    federation = Federation.from_plan(plan, small_model())
    with running_aggregator(plan, federation) as server:
        alice = connect(
            server,
            certs,
            Identity(certs.collaborator_cert("alice"), certs.collaborator_key("alice")),
            "alice",
        )
        try:
            sites = Sites.of(federation, certs, ["alice"], uuid=FEDERATION_UUID)
            post = Post(0, Stage.KEYS, keys=sites.rounds["alice"].advertisement())
            code, details = status(send(alice, post))
            assert code is PRECONDITION and "does not aggregate securely" in details
        finally:
            alice.channel.close()


def test_a_masked_round_runs_end_to_end_over_the_wire(world: World) -> None:
    """All three sites through every stage over TLS, their masked uploads streamed: the round
    closes trained with the weighted mean of the deltas."""
    fed = world.federation
    rounds = world.sites.rounds
    names = tuple(sorted(rounds))
    for name in names:
        assert status(send(world.callers[name], keys(world, name))) == (OK, "")
    for name in names:
        got = relay_from_proto(relay(world.callers[name], Stage.KEYS))
        rounds[name].accept_keys(got.members, got.keys)
        shares = tuple(rounds[name].sealed_shares())
        assert status(send(world.callers[name], Post(0, Stage.SHARES, shares=shares))) == (OK, "")
    model = small_model()
    weights = {"alice": 10, "bob": 30, "carol": 60}
    for name in names:
        got = relay_from_proto(relay(world.callers[name], Stage.SHARES))
        rounds[name].accept_shares(got.members, got.shares)
        delta = {key: np.full(np.shape(a), 0.01 * weights[name]) for key, a in model.items()}
        masked = rounds[name].masked_update(delta, weights[name])
        caller = world.callers[name]
        message = caller.results(
            data_size=1,
            tensors=[_encode(key, array) for key, array in masked.items()],
        )
        assert caller.send(task_results_to_chunks(message)).header.receiver == name
    # the plan's other tasks: a metric each
    for name in names:
        for task in ("aggregated_model_validation", "locally_tuned_model_validation"):
            caller = world.callers[name]
            message = caller.results(
                task_name=task,
                data_size=5,
                tensors=[_encode("accuracy", np.float32(0.5), metric=True)],
            )
            caller.send(task_results_to_chunks(message))
    assert fed.close_round_if_due() is None
    survivors = relay_from_proto(relay(world.callers["alice"], Stage.SURVIVORS)).members
    assert survivors == names
    for name in names:
        confirmation = rounds[name].confirmation(survivors)
        post = Post(0, Stage.SURVIVORS, confirmation=confirmation)
        assert status(send(world.callers[name], post)) == (OK, "")
    for name in names:
        unmask = relay(world.callers[name], Stage.UNMASK)
        # Each confirmation's signature alone: the list is the SURVIVORS relay's, held already.
        assert [list(item.survivors) for item in unmask.confirmations] == [[]] * len(names)
        got = relay_from_proto(unmask)
        shares = tuple(rounds[name].revealed_shares(survivors, got.confirmations))
        assert status(send(world.callers[name], Post(0, Stage.UNMASK, revealed=shares))) == (
            OK,
            "",
        )
    summary = fed.close_round_if_due()
    assert summary is not None and summary.trained
    mean = sum(0.01 * w * w for w in weights.values()) / sum(weights.values())
    for key, array in fed.model().items():
        reference = np.asarray(model[key], dtype=np.float64)
        if array.dtype.kind == "i":
            np.testing.assert_array_equal(array, np.rint(reference + mean))
        else:
            np.testing.assert_allclose(array, reference + mean, atol=1e-5)


def _encode(name: str, array: Any, *, metric: bool = False) -> base_pb2.NamedTensor:
    return encode_tensor(name, np.asarray(array), tags=["metric"] if metric else ["trained"])
