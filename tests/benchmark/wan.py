"""The wide-area round: each site in a network namespace of its own, behind a shaped, delayed link.

The aggregator runs in a namespace of its own; each site (a collaborator process, `wan_site.py`)
in another, joined to the aggregator's by a veth pair. Each end of a pair sends through
`tc ... tbf` at the site's rate, so each site has `rate` down and `rate` up, sites in parallel, as
behind their own wide-area links. A delay line (`delay_line.py`, in the aggregator's namespace,
between the veth and the aggregator) makes every byte, each way, half the added round trip late.
It is a proxy, so TCP runs in two legs (the site to the proxy over the shaped veth, the proxy to
the aggregator on the namespace's loopback); HTTP/2 and TLS run end to end through it and see the
whole round trip, which is what their flow-control windows must cover.

The floor of a round is the bytes each site must move over its link at the shaped rate: the model
down, the trained model up, one after the other (a site trains on what it downloaded), sites in
parallel. Wire overhead (TCP/IP, TLS and HTTP/2 framing) counts against foedus: the floor counts
the model's bytes alone; `wan_wire_over_payload` says how much more went over the links.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from statistics import mean
from typing import Any

from foedus.plans import load_plan

# isort: split
# The benchmark's own modules, beside this file.
import noop_runner
from harness import (
    BENCH_ENV,
    HERE,
    MIB,
    BenchmarkError,
    Process,
    Run,
    limits_for,
    say,
    start_aggregator,
    tensor_byte_sizes,
    write_plan,
)

SITES = 4
SUBNET = "10.205"  # site k's link is SUBNET.k.0/30: the aggregator's end .1, the site's .2
COMMAND_TIMEOUT_SECONDS = 10.0
SITE_CHECK_SECONDS = 1.0  # how often a wait for a round looks whether a site has ended
# tbf: a burst of 64 KiB (one GSO packet; 2.6 ms at 200 Mbit/s) and a queue of 20 ms at the
# rate, a router's buffer that adds little to the round trip when TCP keeps it full.
TBF_BURST = "64kb"
TBF_QUEUE = "20ms"


class LinksUnavailableError(BenchmarkError):
    """This machine would not make the namespaces or links (a container without the right)."""


def aggregator_addresses(sites: int = SITES) -> list[str]:
    """The aggregator's address on each site's link (its certificate must name them)."""
    return [f"{SUBNET}.{site}.1" for site in range(1, sites + 1)]


def unavailable() -> str | None:
    """Why this machine cannot build the links (not root, no iproute2); None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and tc qdiscs)"
    missing = [command for command in ("ip", "tc") if shutil.which(command) is None]
    if missing:
        return f"{' and '.join(missing)} (iproute2) not installed"
    return None


def command(*words: str) -> str:
    """Run one setup command; its stdout, or `BenchmarkError` with its stderr."""
    result = subprocess.run(
        list(words), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False
    )
    if result.returncode != 0:
        raise BenchmarkError(f"{' '.join(words)} exited {result.returncode}: {result.stderr}")
    return result.stdout


def in_namespace(namespace: str) -> list[str]:
    """The command prefix that runs a command inside `namespace`."""
    return ["ip", "netns", "exec", namespace]


@dataclass(frozen=True)
class Site:
    """One site's namespace and link: devices at both ends, the aggregator's address from it."""

    number: int
    namespace: str
    aggregator_device: str
    site_device: str

    @property
    def aggregator_address(self) -> str:
        """The aggregator's end of this site's link."""
        return f"{SUBNET}.{self.number}.1"

    @property
    def site_address(self) -> str:
        """The site's end of its link."""
        return f"{SUBNET}.{self.number}.2"


@dataclass(frozen=True)
class Network:
    """The aggregator's namespace and the sites around it."""

    namespace: str
    sites: tuple[Site, ...]

    def sent_bytes(self) -> tuple[int, int]:
        """Bytes the links' tbf qdiscs sent so far: (down, to the sites; up, to the aggregator)."""
        down = sum(self._sent(self.namespace, site.aggregator_device) for site in self.sites)
        up = sum(self._sent(site.namespace, site.site_device) for site in self.sites)
        return down, up

    @staticmethod
    def _sent(namespace: str, device: str) -> int:
        stats = command(*in_namespace(namespace), "tc", "-s", "qdisc", "show", "dev", device)
        match = re.search(r"tbf .*?Sent (\d+) bytes", stats, re.DOTALL)
        return int(match.group(1)) if match else 0


# A namespace of a wide-area round, tagged with the pid of the benchmark that made it.
_OURS = re.compile(r"foedus-wan-(?:agg|site[0-9]+)-([0-9]+)")


def stale_namespaces(listing: str, alive: Callable[[int], bool]) -> list[str]:
    """The namespaces in `ip netns list`'s `listing` that a benchmark made and could not remove
    (killed with -9: no clean-up ran), its pid no longer `alive`."""
    stale = []
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        match = _OURS.fullmatch(name)
        if match is not None and not alive(int(match.group(1))):
            stale.append(name)
    return stale


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_namespaces() -> None:
    """Remove the namespaces a killed benchmark left (their names would not clash with ours, but
    their veths, addresses and queues would stay on the host until a reboot)."""
    listed = subprocess.run(
        ["ip", "netns", "list"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    for namespace in stale_namespaces(listed.stdout, _alive):
        say(f"removing network namespace {namespace}, left by a benchmark that was killed")
        subprocess.run(
            ["ip", "netns", "del", namespace],
            capture_output=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )


@contextmanager
def network(sites: int, rate_mbit: float) -> Iterator[Network]:
    """The namespaces and links of a wide-area round; all removed afterwards (and any a killed
    benchmark left, first)."""
    _remove_stale_namespaces()
    tag = os.getpid()
    made: list[str] = []
    shaped = Network(
        f"foedus-wan-agg-{tag}",
        tuple(
            Site(k, f"foedus-wan-site{k}-{tag}", f"wan-a{k}", f"wan-s{k}")
            for k in range(1, sites + 1)
        ),
    )
    tbf = ("root", "tbf", "rate", f"{rate_mbit:g}mbit", "burst", TBF_BURST, "latency", TBF_QUEUE)
    try:
        try:
            _build(shaped, made, tbf)
        except BenchmarkError as error:
            raise LinksUnavailableError(str(error)) from None
        yield shaped
    finally:
        for namespace in made:  # deleting a namespace deletes the veth ends in it
            subprocess.run(
                ["ip", "netns", "del", namespace],
                capture_output=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
            )


def _build(shaped: Network, made: list[str], tbf: Sequence[str]) -> None:
    """Make the namespaces (each noted in `made` at once, for the clean-up) and the links."""
    for namespace in (shaped.namespace, *(site.namespace for site in shaped.sites)):
        command("ip", "netns", "add", namespace)
        made.append(namespace)
        command("ip", "-n", namespace, "link", "set", "lo", "up")
    for site in shaped.sites:
        # Made inside the namespaces: nothing of it ever exists in this host's own namespace.
        command(
            *("ip", "-n", shaped.namespace, "link", "add", site.aggregator_device),
            *("type", "veth", "peer", "name", site.site_device, "netns", site.namespace),
        )
        for namespace, device, address in (
            (shaped.namespace, site.aggregator_device, site.aggregator_address),
            (site.namespace, site.site_device, site.site_address),
        ):
            command("ip", "-n", namespace, "addr", "add", f"{address}/30", "dev", device)
            command("ip", "-n", namespace, "link", "set", device, "up")
            command(*in_namespace(namespace), "tc", "qdisc", "add", "dev", device, *tbf)


@dataclass
class WanOutcome:
    """What the wide-area rounds gave; seconds."""

    round_seconds: list[float]  # each round, the first from the start (nothing connected yet)
    floor_seconds: float  # one round's bytes over one site's link, down then up
    download_seconds_max: list[float | None]  # each round's slowest site download
    upload_seconds_max: list[float | None]  # each round's slowest site upload
    site_seconds_max: list[float | None]  # each round's slowest download end to upload start
    last_site_seconds: list[float | None]  # the same span of the site whose upload ended last
    before_download_seconds: list[float | None]  # the previous close (or start) to a download
    close_seconds: list[float | None]  # the last upload's answer to the round's line
    wire_over_payload: float  # bytes over the links / the model bytes the rounds moved


def measure(run: Run, names: Sequence[str]) -> WanOutcome:
    """`wan_rounds` rounds of a `wan_model_mb` model, each of `names` a site behind its own link."""
    args = run.args
    size = int(args.wan_model_mb * MIB)
    tensors = args.round_tensors
    plan_path = write_plan(
        run,
        "wan",
        names,
        model_mb=args.wan_model_mb,
        tensors=tensors,
        limits=limits_for(max(tensor_byte_sizes(size, tensors)), size),
        rounds=args.wan_rounds,
    )
    plan = load_plan(plan_path)
    model_bytes = noop_runner.model_bytes(noop_runner.NoopRunner.initial_model(plan.runner))
    return measure_federation(run, names, Federation(plan_path, model_bytes))


@dataclass(frozen=True)
class Federation:
    """What a wide-area run federates: its plan, the bytes of its model (uncompressed), and the
    interpreter and environment its processes (the aggregator, the sites) run with."""

    plan: Path
    model_bytes: int
    python: str = sys.executable
    env: Mapping[str, str] = field(default_factory=lambda: dict(BENCH_ENV))


def measure_federation(run: Run, names: Sequence[str], federation: Federation) -> WanOutcome:
    """The plan's rounds, each of `names` a site behind its own link."""
    args = run.args
    plan_path = federation.plan
    model_bytes = federation.model_bytes
    rate = args.wan_rate_mbit * 1e6 / 8  # bytes per second
    with network(len(names), args.wan_rate_mbit) as shaped, ExitStack() as stack:
        folder = plan_path.parent
        aggregator, port = start_aggregator(
            plan_path,
            prefix=in_namespace(shaped.namespace),
            python=federation.python,
            env=federation.env,
        )
        stack.enter_context(aggregator)
        line = stack.enter_context(
            Process(
                [
                    *in_namespace(shaped.namespace),
                    sys.executable,
                    str(HERE / "delay_line.py"),
                    *("--upstream", f"127.0.0.1:{port}"),
                    *("--latency", f"{args.wan_rtt_ms / 2000:g}"),
                    *(f"--listen={site.aggregator_address}" for site in shaped.sites),
                ],
                folder / "delay_line.log",
                env=BENCH_ENV,
            )
        )
        line.wait_line(r"^ready$", args.round_timeout)
        ports = {
            match.group(1): int(match.group(2))
            for match in re.finditer(r"^listening (\S+) (\d+)$", line.stdout(), re.MULTILINE)
        }
        sites = []
        for name, site in zip(names, shaped.sites, strict=True):
            process = stack.enter_context(
                Process(
                    [
                        *in_namespace(site.namespace),
                        federation.python,
                        str(HERE / "wan_site.py"),
                        *("--plan", str(plan_path), "--name", name),
                        *("--address", site.aggregator_address),
                        *("--port", str(ports[site.aggregator_address])),
                        *("--state-dir", str(folder / f"{name}-state")),
                    ],
                    folder / f"{name}.log",
                    env=federation.env,
                    stdin=True,
                )
            )
            sites.append(process)
        for process in sites:
            process.wait_line(r"^ready$", args.round_timeout)
        sent_before = shaped.sent_bytes()
        started = time.perf_counter()
        for process in sites:
            process.send_line("go")
        closed = [started]
        for number in range(1, args.wan_rounds + 1):
            pattern = rf"^round {number}/{args.wan_rounds} "
            closed.append(_wait_round(aggregator, sites, pattern, args.round_timeout))
        marks = [_marks(process, args.round_timeout) for process in sites]
        sent_after = shaped.sent_bytes()
    moved = 2 * model_bytes * len(names) * args.wan_rounds
    wire = sum(sent_after) - sum(sent_before)
    return WanOutcome(
        round_seconds=[end - start for start, end in pairwise(closed)],
        floor_seconds=2 * model_bytes / rate,
        download_seconds_max=_longest(marks, "download", args.wan_rounds),
        upload_seconds_max=_longest(marks, "upload", args.wan_rounds),
        site_seconds_max=_longest_between(marks, "download_end", "upload_start", args.wan_rounds),
        last_site_seconds=_last_uploader_between(marks, "download_end", "upload_start"),
        before_download_seconds=[
            None if first is None else first - opened
            for opened, first in zip(closed, _each(marks, "download_start", min), strict=False)
        ],
        close_seconds=[
            None if last is None else end - last
            for end, last in zip(closed[1:], _each(marks, "upload_end", max), strict=False)
        ],
        wire_over_payload=wire / moved,
    )


def _wait_round(
    aggregator: Process, sites: Sequence[Process], pattern: str, timeout: float
) -> float:
    """When the aggregator printed the round's line; `BenchmarkError` as soon as a site has
    ended (it cannot close then) or after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            at, _ = aggregator.wait_line(pattern, min(SITE_CHECK_SECONDS, timeout))
            return at
        except BenchmarkError:
            ended = [site for site in sites if site.process.poll() is not None]
            if ended:
                raise BenchmarkError(
                    f"{ended[0].log.stem} ended (exit code {ended[0].process.poll()}) before "
                    f"the round closed; its stderr:\n{ended[0].stderr_tail()}"
                ) from None
            if time.monotonic() >= deadline or aggregator.process.poll() is not None:
                raise


def _marks(site: Process, timeout: float) -> dict[str, dict[str, float]]:
    _, match = site.wait_line(r"^marks (.*)$", timeout)
    marks: dict[str, dict[str, float]] = json.loads(match.group(1))
    return marks


def _longest(
    marks: Sequence[dict[str, dict[str, float]]], what: str, rounds: int
) -> list[float | None]:
    """Each round's longest `what` (download, upload) among the sites; None if none noted."""
    return _longest_between(marks, f"{what}_start", f"{what}_end", rounds)


def _longest_between(
    marks: Sequence[dict[str, dict[str, float]]], start: str, end: str, rounds: int
) -> list[float | None]:
    """Each round's longest span from mark `start` to mark `end` among the sites; None if none
    noted both."""
    longest: list[float | None] = []
    for number in range(rounds):
        spans = [
            got[end] - got[start]
            for site in marks
            if start in (got := site.get(str(number), {})) and end in got
        ]
        longest.append(max(spans, default=None))
    return longest


def _last_uploader_between(
    marks: Sequence[dict[str, dict[str, float]]], start: str, end: str
) -> list[float | None]:
    """Each round's span from mark `start` to mark `end` of the site whose upload ended last
    (the one the round waited for); None if that site did not note both."""
    rounds = max((len(site) for site in marks), default=0)
    spans: list[float | None] = []
    for number in range(rounds):
        noted = [got for site in marks if "upload_end" in (got := site.get(str(number), {}))]
        last = max(noted, key=lambda got: got["upload_end"], default={})
        spans.append(last[end] - last[start] if start in last and end in last else None)
    return spans


def _each(
    marks: Sequence[dict[str, dict[str, float]]],
    mark: str,
    pick: Callable[[list[float]], float],
) -> list[float | None]:
    """Each round's first (`min`) or last (`max`) `mark` among the sites; None if none noted."""
    rounds = max((len(site) for site in marks), default=0)
    picked: list[float | None] = []
    for number in range(rounds):
        times = [got[mark] for site in marks if mark in (got := site.get(str(number), {}))]
        picked.append(pick(times) if times else None)
    return picked


def figures(outcome: WanOutcome) -> dict[str, Any]:
    """The outcome as `bench.json`'s `wan_*` keys; steady: the mean of the rounds after the first."""
    first, *later = outcome.round_seconds
    steady = mean(later) if later else None
    floor = outcome.floor_seconds
    return {
        "wan_round_seconds": first,
        "wan_steady_round_seconds": steady,
        "wan_floor_seconds": floor,
        "wan_ratio": first / floor,
        "wan_steady_ratio": None if steady is None else steady / floor,
        "wan_rounds_seconds": outcome.round_seconds,
        "wan_download_seconds_max": outcome.download_seconds_max,
        "wan_upload_seconds_max": outcome.upload_seconds_max,
        "wan_before_download_seconds": outcome.before_download_seconds,
        "wan_close_seconds": outcome.close_seconds,
        "wan_wire_over_payload": outcome.wire_over_payload,
    }


def measure_phase(run: Run, names: Sequence[str]) -> None:
    """The wide-area rounds into `run.results`, or a note saying why they were skipped."""
    args = run.args
    reason = unavailable() if args.wan else "--no-wan"
    if reason is None:
        try:
            outcome = measure(run, names[:SITES])
        except LinksUnavailableError as error:
            reason = f"the links could not be made: {str(error).splitlines()[0]}"
    if reason is not None:
        run.note(f"wide-area round skipped: {reason}")
        return
    run.results.update(figures(outcome))
    say(
        f"wide-area round: {SITES} sites at {args.wan_rate_mbit:g} Mbit/s each way, "
        f"{args.wan_rtt_ms:g} ms round trip, {args.wan_model_mb:g} MB: rounds "
        f"{', '.join(f'{s:.2f}' for s in outcome.round_seconds)} s, floor "
        f"{outcome.floor_seconds:.2f} s"
    )
