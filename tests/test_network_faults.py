"""Network faults mid-federation: the federation still finishes, with the very same final model.

Two ways. Through `FaultProxy`, a TCP proxy of ours between the collaborators and the aggregator
on 127.0.0.1 (TLS passes through it untouched): added latency, a connection reset in the middle
of an upload, a stall that outlives the call deadline, and an upload cut short. Across real
hosts: the aggregator and the collaborators in two network namespaces of their own joined by a
veth pair, whose link is throttled with `tc ... tbf` and cut for 10 s in the middle of a round.

Every run uses a plan whose retries are bounded by time rather than count (a 10 s outage is many
failed connection attempts at a 1 s backoff), with a 3 s deadline so a stall costs seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from foedus.pki.layout import CertsLayout
from foedus.pki.local import setup_local_federation

from fault_proxy import Fault, FaultKind, FaultProxy, Fired
from federation_processes import COLLABORATORS, FederationProcesses, run_federation, write_plan

pytestmark = pytest.mark.slow

ROUNDS = 2
RUN_SECONDS = 90
START_SECONDS = 30
# Retries bounded by time, not count; a short deadline so a stalled call gives up after 3 s.
FAULT_TOLERANT: Final = {"deadline_seconds": 3, "max_retries": None, "max_wait_seconds": 60}
# A collaborator's requests and metric uploads are under 1.5 kB (its TLS ClientHello is about
# 1.5 kB too); a trained model's upload is about 2.9 kB, so a fault armed at 2 kB hits the first
# train upload, in the middle of round 1.
UPLOAD_CUT_BYTES = 2048
LATENCY_SECONDS = 0.05
STALL_SECONDS = 5.0
LINK_CUT_SECONDS = 10.0
TBF = ("rate", "1mbit", "burst", "32kbit", "latency", "400ms")
EVERYONE_OK: Final = dict.fromkeys(("aggregator", *COLLABORATORS), 0)


@pytest.fixture(scope="module")
def reference_model(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The final model of a fault-free run of the same rounds and runner."""
    run = run_federation(tmp_path_factory.mktemp("reference"), certs, rounds=ROUNDS)
    assert run.exit_codes == EVERYONE_OK, run
    return (run.output_dir / "last_model.pbuf").read_bytes()


def process_logs(folder: Path) -> str:
    """The last lines of every process's stderr, to explain a failure."""
    parts = []
    for path in sorted(folder.glob("*.log")):
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        parts.append(f"--- {path.name}\n" + "\n".join(tail))
    return "\n".join(parts)


def wait_for_log(folder: Path, name: str, pattern: str, timeout: float) -> None:
    """Poll a process's stderr log until `pattern` appears; fail after `timeout` seconds."""
    path = folder / f"{name}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(encoding="utf-8")):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} did not log {pattern!r} in {timeout} s:\n{process_logs(folder)}")


# -- through the fault proxy -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProxiedRun:
    """What a federation run through the proxy left behind, and what the proxy did to it."""

    exit_codes: dict[str, int]
    model: bytes | None
    fired: tuple[Fired, ...]
    connections: int
    seconds: float
    logs: str


def run_through_proxy(
    folder: Path, certs: CertsLayout, inject: Callable[[FaultProxy], None]
) -> ProxiedRun:
    """Run a federation whose collaborators reach the aggregator only through a `FaultProxy`.

    Both plans are the same but for `aggregator.port`: the aggregator's is its own, the
    collaborators' is the proxy's. `inject` sets the proxy's faults before anyone connects.
    """
    plan = write_plan(folder, certs, ROUNDS, connection=FAULT_TOLERANT)
    document: dict[str, Any] = yaml.safe_load(plan.read_text(encoding="utf-8"))
    federation = FederationProcesses(plan, folder)
    started = time.monotonic()
    with FaultProxy("127.0.0.1", document["aggregator"]["port"]) as proxy:
        document["aggregator"]["port"] = proxy.port
        collaborators_plan = folder / "collaborators-plan.yaml"
        collaborators_plan.write_text(yaml.safe_dump(document), encoding="utf-8")
        inject(proxy)
        try:
            federation.start("aggregator")
            federation.wait_for_output("aggregator", "serving federation", START_SECONDS)
            for name in COLLABORATORS:
                federation.start(name, plan=collaborators_plan)
            codes = federation.wait_all(RUN_SECONDS)
        finally:
            federation.stop_all()
    model = folder / "output" / "last_model.pbuf"
    return ProxiedRun(
        exit_codes=codes,
        model=model.read_bytes() if model.exists() else None,
        fired=proxy.fired,
        connections=proxy.connections,
        seconds=time.monotonic() - started,
        logs=process_logs(folder),
    )


def test_latency_on_every_chunk_gives_the_same_model(
    certs: CertsLayout, reference_model: bytes, tmp_path: Path
) -> None:
    """With 50 ms added to every chunk each way, everyone exits 0 with the fault-free final model."""
    run = run_through_proxy(tmp_path, certs, lambda proxy: proxy.set_latency(LATENCY_SECONDS))
    assert run.exit_codes == EVERYONE_OK, run.logs
    assert run.model == reference_model, run.logs


@pytest.mark.parametrize(
    "fault",
    [
        Fault(FaultKind.RESET, at_bytes=UPLOAD_CUT_BYTES),
        Fault(FaultKind.HALF_SENT, at_bytes=UPLOAD_CUT_BYTES),
        Fault(FaultKind.STALL, at_bytes=UPLOAD_CUT_BYTES, seconds=STALL_SECONDS),
    ],
    ids=lambda fault: fault.kind.value,
)
def test_an_upload_fault_is_retried_and_gives_the_same_model(
    fault: Fault, certs: CertsLayout, reference_model: bytes, tmp_path: Path
) -> None:
    """An upload reset, cut short or stalled past the deadline is sent again; the model is unchanged."""
    run = run_through_proxy(tmp_path, certs, lambda proxy: proxy.arm(fault))
    assert [fired.fault for fired in run.fired] == [fault], run.logs
    assert run.exit_codes == EVERYONE_OK, run.logs
    assert run.model == reference_model, run.logs
    # The collaborator hit gave up on its connection and opened a new one.
    assert run.connections > len(COLLABORATORS), run
    if fault.kind is FaultKind.STALL:
        assert run.seconds > STALL_SECONDS, run


# -- across network namespaces ---------------------------------------------------------------------


@dataclass(frozen=True)
class VethLink:
    """Two network namespaces of this test, joined by a veth pair with a /30 between them."""

    aggregator_ns: str
    collaborator_ns: str
    aggregator_dev: str = "veth-agg"
    collaborator_dev: str = "veth-col"
    aggregator_ip: str = "10.203.0.1"
    collaborator_ip: str = "10.203.0.2"
    prefix_length: int = 30

    def exec_in(self, ns: str) -> list[str]:
        """The command prefix that runs a command inside namespace `ns`."""
        return ["ip", "netns", "exec", ns]

    def ends(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """(namespace, device) of each end of the link."""
        return (
            (self.aggregator_ns, self.aggregator_dev),
            (self.collaborator_ns, self.collaborator_dev),
        )


def run_command(command: Sequence[str]) -> str:
    """Run one setup command; its stdout, or an error that shows its stderr."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}")
    return result.stdout


def namespaces_unavailable(reason: str) -> None:
    """Skip with `reason`, except in CI, where these tests must run."""
    message = f"network namespaces unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def remove_stale_namespaces() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone (a run killed from outside
    cannot clean up after itself); the names removed."""
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False
    )
    removed = []
    for line in listed.stdout.splitlines():
        found = re.match(r"(foedus-(?:agg|col)-(\d+))\b", line)
        if found is None or int(found[2]) == os.getpid():
            continue
        try:
            os.kill(int(found[2]), 0)
        except ProcessLookupError:
            subprocess.run(
                ["ip", "netns", "del", found[1]], capture_output=True, timeout=10, check=False
            )
            removed.append(found[1])
        except PermissionError:
            pass  # alive, another user's
    return removed


@pytest.fixture
def veth_link() -> Iterator[VethLink]:
    """Namespaces foedus-agg-PID and foedus-col-PID joined by veth; both removed afterwards."""
    link = VethLink(f"foedus-agg-{os.getpid()}", f"foedus-col-{os.getpid()}")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        namespaces_unavailable("the `ip` and `tc` commands (iproute2) are not installed")
    remove_stale_namespaces()
    made: list[str] = []
    try:
        for ns in (link.aggregator_ns, link.collaborator_ns):
            result = subprocess.run(
                ["ip", "netns", "add", ns], capture_output=True, text=True, timeout=10, check=False
            )
            if result.returncode != 0:
                namespaces_unavailable(f"`ip netns add {ns}` failed: {result.stderr.strip()}")
            made.append(ns)
        # Made inside the namespaces: nothing of it ever exists in this host's own namespace.
        run_command(
            [
                *("ip", "-n", link.aggregator_ns, "link", "add", link.aggregator_dev),
                *("type", "veth", "peer", "name", link.collaborator_dev),
                *("netns", link.collaborator_ns),
            ]
        )
        for (ns, dev), address in zip(
            link.ends(), (link.aggregator_ip, link.collaborator_ip), strict=True
        ):
            run_command(
                ["ip", "-n", ns, "addr", "add", f"{address}/{link.prefix_length}", "dev", dev]
            )
            run_command(["ip", "-n", ns, "link", "set", "lo", "up"])
            run_command(["ip", "-n", ns, "link", "set", dev, "up"])
        yield link
    finally:
        for ns in made:  # deleting a namespace deletes the veth end in it, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


def test_a_namespace_left_by_a_killed_run_is_removed_and_a_live_one_kept() -> None:
    """A run killed from outside leaves its namespaces: the next run's sweep deletes those of a
    process that is gone, never those of one alive."""
    if shutil.which("ip") is None:
        namespaces_unavailable("the `ip` command (iproute2) is not installed")
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    alive = subprocess.Popen(["sleep", "60"])
    stale, live = f"foedus-col-{gone.pid}", f"foedus-agg-{alive.pid}"
    try:
        for ns in (stale, live):
            result = subprocess.run(
                ["ip", "netns", "add", ns], capture_output=True, text=True, timeout=10, check=False
            )
            if result.returncode != 0:
                namespaces_unavailable(f"`ip netns add {ns}` failed: {result.stderr.strip()}")
        assert stale in remove_stale_namespaces()
        listed = run_command(["ip", "netns", "list"])
        assert stale not in listed and live in listed, listed
    finally:
        alive.kill()
        alive.wait(timeout=10)
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


def set_throttle(link: VethLink, *, on: bool) -> list[int]:
    """Add (or remove) a tbf qdisc on both ends; on removal, the bytes each one sent."""
    sent = []
    for ns, dev in link.ends():
        tc = [*link.exec_in(ns), "tc"]
        if on:
            run_command([*tc, "qdisc", "add", "dev", dev, "root", "tbf", *TBF])
        else:
            stats = run_command([*tc, "-s", "qdisc", "show", "dev", dev])
            match = re.search(r"tbf .*?Sent (\d+) bytes", stats, re.DOTALL)
            sent.append(int(match.group(1)) if match else 0)
            run_command([*tc, "qdisc", "del", "dev", dev, "root"])
    return sent


@pytest.fixture(scope="module")
def namespace_certs(tmp_path_factory: pytest.TempPathFactory) -> CertsLayout:
    """A federation's certificates whose aggregator certificate names its namespace address."""
    layout = CertsLayout(tmp_path_factory.mktemp("namespace-certs"))
    setup_local_federation(
        layout,
        aggregator_host="agg.test",
        dns_names=["agg.test"],
        ip_addresses=[VethLink.aggregator_ip],
        collaborators=COLLABORATORS,
    )
    return layout


def test_a_link_cut_mid_round_and_a_throttle_give_the_same_model(
    veth_link: VethLink, namespace_certs: CertsLayout, reference_model: bytes, tmp_path: Path
) -> None:
    """Over a throttled veth link cut for 10 s mid-round, everyone exits 0 with the same model."""
    # Alice and Bob finish round 1 and wait for Carol, which holds the round open; then the link
    # goes down, Carol starts, and the link comes back 10 s later. tbf holds until round 1 closes.
    link = veth_link
    address = link.aggregator_ip
    plan = write_plan(
        tmp_path,
        namespace_certs,
        ROUNDS,
        aggregator={
            "host": address,
            "common_name": "agg.test",
            "listen_address": address,
            "san_dns": ["agg.test"],
            "san_ips": [address],
        },
        connection=FAULT_TOLERANT,
    )
    in_aggregator_ns = link.exec_in(link.aggregator_ns)
    in_collaborator_ns = link.exec_in(link.collaborator_ns)
    link_state = [*in_collaborator_ns, "ip", "link", "set", link.collaborator_dev]
    federation = FederationProcesses(plan, tmp_path)
    try:
        set_throttle(link, on=True)
        federation.start("aggregator", prefix=in_aggregator_ns)
        federation.wait_for_output("aggregator", "serving federation", START_SECONDS)
        early, late = COLLABORATORS[:2], COLLABORATORS[2]
        for name in early:
            federation.start(name, prefix=in_collaborator_ns)
        for name in early:
            wait_for_log(tmp_path, name, r"round 0: locally_tuned_model_validation", RUN_SECONDS)
        run_command([*link_state, "down"])
        cut_at = time.monotonic()
        federation.start(late, prefix=in_collaborator_ns)
        time.sleep(LINK_CUT_SECONDS)
        run_command([*link_state, "up"])
        cut_seconds = time.monotonic() - cut_at
        federation.wait_for_output("aggregator", rf"round 1/{ROUNDS} ", RUN_SECONDS)
        throttled = set_throttle(link, on=False)
        codes = federation.wait_all(RUN_SECONDS)
    finally:
        federation.stop_all()
    logs = process_logs(tmp_path)
    assert codes == EVERYONE_OK, logs
    assert (tmp_path / "output" / "last_model.pbuf").read_bytes() == reference_model, logs
    assert cut_seconds >= LINK_CUT_SECONDS
    assert all(sent > 0 for sent in throttled), throttled
    # The cut was felt: calls failed and were retried on both sides of it.
    for name in COLLABORATORS:
        log = (tmp_path / f"{name}.log").read_text(encoding="utf-8")
        assert re.search(r"failed with \w+ .*; retry \d+", log), logs
