"""Operations with real processes: metrics scraped over HTTP during and after a federation, and
health on a full disk (NOT_SERVING, then SERVING again when space returns, and the federation ends).

The full-disk test mounts a small tmpfs for `aggregator.output_dir` and unmounts it afterwards;
that needs root. Elsewhere it skips and says why; under `CI` it fails instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from foedus.aggregator.health import PROBE_BYTES
from foedus.aggregator.server import SERVICE
from foedus.aggregator.storage import read_model
from foedus.pki.layout import CertsLayout
from foedus.pki.local import load_signing_ca
from foedus.pki.requests import Role
from foedus.protos import aggregator_pb2, aggregator_pb2_grpc

from conftest import Identity, issue_identity
from federation_processes import COLLABORATORS, FederationProcesses, free_port, write_plan

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_SECONDS = 90
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# dave is in the plan but never comes: the rounds close without him (percentage), and the
# aggregator waits for him to collect his quit, which leaves time to look at it after the end.
WITHOUT_DAVE: dict[str, Any] = {
    "collaborators": [*COLLABORATORS, "dave"],
    "straggler": {"policy": "percentage", "percentage": 0.75, "min_reports": 3},
}
STAYS_AFTER_THE_END = {"quit_grace_seconds": 300}


def scrape(port: int) -> Samples:
    """Every sample of the metrics endpoint, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a missing one fails the test, naming what there is."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{key} not scraped; have {sorted(k[0] for k in samples)}"
    return samples[key]


def wait_until(condition: str, probe: object, timeout: float = WAIT_SECONDS) -> None:
    """Call `probe()` about 5 times a second until it is true; fail after `timeout` seconds."""
    assert callable(probe)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {condition}")


def tls_channel(port: int, certs: CertsLayout, identity: Identity) -> grpc.Channel:
    """A channel to the aggregator over mutual TLS, presenting `identity`."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca_bundle.read_bytes(),
        private_key=identity.key.read_bytes(),
        certificate_chain=identity.cert.read_bytes(),
    )
    return grpc.secure_channel(f"localhost:{port}", credentials)


@pytest.fixture(scope="module")
def probe_identity(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """A health probe's certificate of the federation's CA, not a collaborator's name."""
    signing_key, signing_cert = load_signing_ca(certs)
    return issue_identity(
        tmp_path_factory.mktemp("probe"),
        Role.COLLABORATOR,
        "health-probe",
        signing_key=signing_key,
        signing_cert=signing_cert,
    )


def aggregator_port(plan: Path) -> int:
    """The aggregator's port written in `plan`."""
    match = re.search(r"^  port: (\d+)$", plan.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, "no aggregator.port in the plan"
    return int(match.group(1))


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_during_and_after_a_federation(
    certs: CertsLayout, tmp_path: Path, stranger: Identity
) -> None:
    """Scraped over HTTP while a real federation runs and after its last round: the rounds, the
    accepted results, the bytes both ways and a stranger's refusal, each with its right value."""
    metrics_port = free_port()
    plan = write_plan(
        tmp_path,
        certs,
        2,
        aggregator={"metrics_address": f"127.0.0.1:{metrics_port}", **STAYS_AFTER_THE_END},
        **WITHOUT_DAVE,
    )
    federation = FederationProcesses(plan, tmp_path)
    try:
        federation.start("aggregator")
        federation.wait_for_output("aggregator", "metrics on http://", WAIT_SECONDS)
        before = scrape(metrics_port)
        assert value(before, "foedus_round") == 0
        assert value(before, "foedus_serving") == 1
        assert value(before, "foedus_rounds_total") == 0
        assert value(before, "foedus_storage_free_bytes") > 0

        with tls_channel(aggregator_port(plan), certs, stranger) as channel:
            stub = aggregator_pb2_grpc.AggregatorStub(channel)
            header = aggregator_pb2.MessageHeader(sender="mallory")
            with pytest.raises(grpc.RpcError) as caught:
                stub.Ping(aggregator_pb2.PingRequest(header=header), timeout=10)
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED

        for name in COLLABORATORS:
            federation.start(name)
        federation.wait_for_output("aggregator", r"round 1/2", WAIT_SECONDS)
        during = scrape(metrics_port)
        assert value(during, "foedus_round") >= 1
        assert value(during, "foedus_rounds_total") >= 1
        assert value(during, "foedus_results_accepted_total") >= 9  # 3 collaborators x 3 tasks

        federation.wait_for_output("aggregator", "federation finished", WAIT_SECONDS)
        for name in COLLABORATORS:
            assert federation.wait(name, WAIT_SECONDS) == 0
        after = scrape(metrics_port)
        rounds = federation.output().count("reported ")  # one line per closed round
        assert rounds == 3  # 2 training rounds and the final validation
        assert value(after, "foedus_rounds_total") == rounds
        assert value(after, "foedus_round") == rounds
        assert value(after, "foedus_round_seconds_count") == rounds
        assert value(after, "foedus_round_seconds_sum") > 0
        # 3 tasks of 3 collaborators in each training round, 1 task each in the final round.
        assert value(after, "foedus_results_accepted_total") == 3 * 3 * 2 + 3
        refused = value(after, "foedus_rpc_refusals_total", rpc="Ping", code="PERMISSION_DENIED")
        assert refused == 1

        model_bytes = sum(
            array.nbytes
            for array in read_model(tmp_path / "output" / "last_model.pbuf", 2**30).values()
        )
        uploaded = value(after, "foedus_upload_bytes_total")
        downloaded = value(after, "foedus_download_bytes_total")
        # Each round every collaborator fetches the model; each training round it uploads a
        # trained one (and small metrics results); framing adds a little to both.
        assert 3 * rounds * model_bytes <= downloaded < 2 * 3 * rounds * model_bytes
        assert 3 * 2 * model_bytes <= uploaded < 2 * 3 * 2 * model_bytes

        federation.processes["aggregator"].send_signal(signal.SIGTERM)
        federation.wait("aggregator", WAIT_SECONDS)
        with pytest.raises(OSError):  # stopped with the aggregator
            scrape(metrics_port)
    finally:
        federation.stop_all()


# --- health on a full disk ------------------------------------------------------------------------


def small_filesystem_unavailable(reason: str) -> None:
    """Skip with `reason`, except in CI, where this test must run."""
    message = f"cannot mount a small file system: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted at `tmp_path/disk`, unmounted afterwards."""
    if os.geteuid() != 0:
        small_filesystem_unavailable("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "foedus-test", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        small_filesystem_unavailable(f"`mount -t tmpfs` failed: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(
            ["umount", "-l", str(mount_point)], capture_output=True, timeout=30, check=False
        )


def fill(folder: Path) -> Path:
    """A file that takes every free byte of `folder`'s file system (bounded by its size)."""
    ballast = folder / "ballast"
    block = bytes(1024 * 1024)
    with ballast.open("wb", buffering=0) as file:
        for size in (len(block), 4096):
            for _ in range(1 + os.statvfs(folder).f_blocks * os.statvfs(folder).f_frsize // size):
                try:
                    file.write(block[:size])
                except OSError as error:
                    assert error.errno == errno.ENOSPC
                    break
    assert os.statvfs(folder).f_bavail == 0
    return ballast


def test_full_disk_turns_health_off_until_space_returns(
    certs: CertsLayout, tmp_path: Path, small_disk: Path, probe_identity: Identity
) -> None:
    """With aggregator.output_dir on a full disk the collaborators' calls that store fail, the
    health goes NOT_SERVING and the metrics show no free bytes; once space is freed the health
    is SERVING again and the federation finishes."""
    metrics_port = free_port()
    plan = write_plan(
        tmp_path,
        certs,
        1,
        aggregator={
            "output_dir": str(small_disk / "output"),
            "metrics_address": f"127.0.0.1:{metrics_port}",
            **STAYS_AFTER_THE_END,
        },
        # Retry long enough for the test to see the disk full and free it.
        connection={"max_retries": 1000, "max_wait_seconds": 300, "backoff_max_seconds": 0.5},
        **WITHOUT_DAVE,
    )
    federation = FederationProcesses(plan, tmp_path)
    try:
        federation.start("aggregator")
        federation.wait_for_output("aggregator", "metrics on http://", WAIT_SECONDS)
        with tls_channel(aggregator_port(plan), certs, probe_identity) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str = "") -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return health.Check(request, timeout=10).status

            assert status() == SERVING
            ballast = fill(small_disk)
            for name in COLLABORATORS:
                federation.start(name)
            wait_until("health NOT_SERVING", lambda: status() == NOT_SERVING)
            assert status(SERVICE) == NOT_SERVING
            full = scrape(metrics_port)
            assert value(full, "foedus_serving") == 0
            assert value(full, "foedus_storage_free_bytes") < PROBE_BYTES
            refusals = [
                count
                for (name, labels), count in full.items()
                if name == "foedus_rpc_refusals_total" and ("code", "UNAVAILABLE") in labels
            ]
            assert sum(refusals) >= 1
            assert "NOT_SERVING: cannot store" in (tmp_path / "aggregator.log").read_text()

            # Watched, so the change is seen however soon the federation then finishes.
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=WAIT_SECONDS)
            assert next(watch).status == NOT_SERVING
            ballast.unlink()
            assert next(watch).status == SERVING
            watch.cancel()
            for name in COLLABORATORS:
                assert federation.wait(name, WAIT_SECONDS) == 0
            assert status() == status(SERVICE) == SERVING
            assert value(scrape(metrics_port), "foedus_storage_free_bytes") > PROBE_BYTES
        federation.wait_for_output("aggregator", "federation finished", WAIT_SECONDS)
        assert "storage works again" in (tmp_path / "aggregator.log").read_text()
        federation.processes["aggregator"].send_signal(signal.SIGTERM)
        federation.wait("aggregator", WAIT_SECONDS)
    finally:
        federation.stop_all()
        with contextlib.suppress(OSError):
            (small_disk / "ballast").unlink()
