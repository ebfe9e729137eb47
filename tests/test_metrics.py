"""Metrics: the instruments read and counted, the HTTP server started and stopped with a real
aggregator. Scraping a whole federation of processes is in `test_operations.py`."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from foedus.aggregator.federation import Federation
from foedus.aggregator.metrics import Metrics
from foedus.aggregator.server import AggregatorGRPCServer
from foedus.pki.layout import CertsLayout
from foedus.privacy.accountant import epsilon_after
from foedus.protos import aggregator_pb2
from foedus.refusals.errors import AuthorizationError
from foedus.serving.server import ServerError

from conftest import Identity
from federations import model
from servers import make_federation, make_plan
from test_dp_federation import dp_plan, play_round
from test_server import connect


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_instruments_count_and_read() -> None:
    """Counters count what they are told; gauges read their source at each scrape."""
    round_number = [0]
    metrics = Metrics(
        round_number=lambda: round_number[0],
        storage_free_bytes=lambda: 1234.0,
        serving=lambda: True,
        collaborators_online=lambda: 2,
    )
    metrics.round_closed(3.5)
    metrics.result_accepted()
    metrics.refused("Ping", "PERMISSION_DENIED", AuthorizationError("who?"))
    metrics.refused("Ping", "PERMISSION_DENIED", AuthorizationError("who?"))
    metrics.uploaded(100)
    metrics.downloaded(0)
    round_number[0] = 1
    got = samples(generate_latest(metrics.registry).decode())
    assert got[("foedus_round", ())] == 1
    assert got[("foedus_rounds_total", ())] == 1
    assert got[("foedus_round_seconds_sum", ())] == 3.5
    assert got[("foedus_round_seconds_bucket", (("le", "5.0"),))] == 1
    assert got[("foedus_results_accepted_total", ())] == 1
    assert got[("foedus_rpc_refusals_total", (("code", "PERMISSION_DENIED"), ("rpc", "Ping")))] == 2
    assert got[("foedus_upload_bytes_total", ())] == 100
    assert got[("foedus_download_bytes_total", ())] == 0
    assert got[("foedus_storage_free_bytes", ())] == 1234
    assert got[("foedus_serving", ())] == 1
    assert got[("foedus_collaborators_online", ())] == 2


def test_own_registry_not_the_global_one() -> None:
    """Two aggregators in one process do not collide, and nothing goes to the default registry."""
    for _ in range(2):
        Metrics(round_number=lambda: 0, storage_free_bytes=lambda: 0.0, serving=lambda: False)
    assert b"foedus_" not in generate_latest(REGISTRY)


def test_online_gauge_only_with_a_source() -> None:
    """Without a source of the online count, the gauge is absent rather than made up."""
    metrics = Metrics(round_number=lambda: 0, storage_free_bytes=lambda: 0.0, serving=lambda: True)
    assert b"foedus_collaborators_online" not in generate_latest(metrics.registry)


def test_privacy_budget_gauges_follow_the_rounds_closed() -> None:
    """A DP federation's gauges: epsilon 0 before any round, then the accountant's value after
    each closed training round, the same once its budget's last round is done (the final
    validation spends nothing); its delta and cap. No cap: no cap gauge. Plain: no gauges."""
    cap = (epsilon_after(2, 1.1, 1e-5) + epsilon_after(3, 1.1, 1e-5)) / 2
    plan = dp_plan(5, max_epsilon=cap)
    federation = Federation.from_plan(plan, model())
    scrape = AggregatorGRPCServer(plan, federation).metrics.registry
    epsilons = [samples(generate_latest(scrape).decode())[("foedus_dp_epsilon", ())]]
    while not federation.finished:
        play_round(federation, plan.collaborators)
        epsilons.append(samples(generate_latest(scrape).decode())[("foedus_dp_epsilon", ())])
    spent = [epsilon_after(rounds, 1.1, 1e-5) for rounds in (1, 2)]
    assert epsilons == [0.0, *spent, spent[-1]]  # 2 rounds within the cap, then final validation
    got = samples(generate_latest(scrape).decode())
    assert got[("foedus_dp_delta", ())] == 1e-5
    assert got[("foedus_dp_max_epsilon", ())] == cap
    uncapped = dp_plan(2, max_epsilon=None)
    page = generate_latest(
        AggregatorGRPCServer(uncapped, Federation.from_plan(uncapped, model())).metrics.registry
    ).decode()
    assert "foedus_dp_epsilon 0.0" in page and "foedus_dp_max_epsilon" not in page
    plain = make_plan(None)
    page = generate_latest(AggregatorGRPCServer(plain, make_federation(plain)).metrics.registry)
    assert b"foedus_dp_" not in page


def test_metrics_served_with_the_aggregator_and_refusals_counted(
    certs: CertsLayout, tmp_path: Path, stranger: Identity
) -> None:
    """The endpoint serves while the aggregator does; a stranger's call is counted by RPC and
    status; the endpoint is gone once the aggregator stops."""
    plan = make_plan(
        certs,
        aggregator={"output_dir": str(tmp_path), "metrics_address": "127.0.0.1:0"},
    )
    server = AggregatorGRPCServer(plan, make_federation(plan))
    server.start()
    try:
        assert server.metrics_server is not None
        url = f"http://127.0.0.1:{server.metrics_server.port}/metrics"
        mallory = connect(server, certs, stranger, "mallory")
        with mallory.channel, pytest.raises(grpc.RpcError) as caught:
            mallory.stub.Ping(aggregator_pb2.PingRequest(header=mallory.header()), timeout=10)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with urllib.request.urlopen(url, timeout=10) as response:
            got = samples(response.read().decode())
        assert (
            got[("foedus_rpc_refusals_total", (("code", "PERMISSION_DENIED"), ("rpc", "Ping")))]
            == 1
        )
        assert got[("foedus_serving", ())] == 1
        assert got[("foedus_storage_free_bytes", ())] > 0
        assert got[("foedus_collaborators_online", ())] == 0  # a refused call counts for nobody
        alice = connect(
            server,
            certs,
            Identity(certs.collaborator_cert("alice"), certs.collaborator_key("alice")),
            "alice",
        )
        with alice.channel:
            alice.stub.Ping(aggregator_pb2.PingRequest(header=alice.header()), timeout=10)
        with urllib.request.urlopen(url, timeout=10) as response:
            got = samples(response.read().decode())
        assert got[("foedus_collaborators_online", ())] == 1  # the federation's liveness
    finally:
        server.stop(0)
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=10)


def test_metrics_address_in_use_stops_the_start(certs: CertsLayout, tmp_path: Path) -> None:
    """A metrics address that cannot be bound is a ServerError naming the field; nothing serves."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        plan = make_plan(
            certs,
            aggregator={"output_dir": str(tmp_path), "metrics_address": f"127.0.0.1:{port}"},
        )
        server = AggregatorGRPCServer(plan, make_federation(plan))
        with pytest.raises(ServerError, match=r"aggregator\.metrics_address: cannot serve metrics"):
            server.start()
