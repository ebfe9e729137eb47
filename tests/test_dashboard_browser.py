"""The dashboard in a real headless Chromium during a real run: a director, its aggregator, and
three real envoy processes running the sites' collaborators.

Chromium trusts exactly the director's key (its SPKI pin), not any certificate. Debian's
`chromium` and `chromium-driver` are needed: a machine without them skips with the reason, CI
fails instead (`.ci/run` installs them).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from director.launcher import LocalLauncher
from director.tokens import TokenStore
from envoy.state import EnvoyState
from pki.layout import CertsLayout
from protos import director_pb2 as pb

from directors import ENVOYS, Director, make_director_certs, running_director, submitted_plan
from envoys import EnvoyProcess, stop_collaborators, write_envoy_config

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 180
ROUNDS = 6
SCREENSHOT = Path(__file__).resolve().parent.parent / "build" / "test-dashboard.png"


def browser_unavailable(reason: str) -> None:
    """Skip with `reason`, except in CI, where this test must run."""
    message = f"headless Chromium unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_ports(count: int) -> list[int]:
    """`count` neighbouring TCP ports on 127.0.0.1 that nothing listens on right now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first: int = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind(("127.0.0.1", first + offset))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return list(range(first, first + count))
    raise AssertionError("no free neighbouring ports")


def spki_pin(certificate: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a certificate: what Chromium pins."""
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def browser(tmp_path: Path, director_certs: CertsLayout) -> Iterator[Any]:
    """Headless Chromium through chromium-driver, trusting only the director's key."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            browser_unavailable(f"{path} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
        f"--ignore-certificate-errors-spki-list={spki_pin(director_certs.aggregator_cert)}",
    ):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    except Exception as error:  # the browser cannot start here: say why
        browser_unavailable(f"{type(error).__name__}: {error}".splitlines()[0])
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def director_certs(tmp_path_factory: pytest.TempPathFactory) -> CertsLayout:
    """Certificates of a director on localhost, its envoys and people."""
    return make_director_certs(tmp_path_factory.mktemp("browser-certs"))


@pytest.fixture
def director(tmp_path: Path, director_certs: CertsLayout) -> Iterator[Director]:
    """A director with real aggregators and its dashboard on loopback; aggregators killed after."""
    with running_director(
        tmp_path,
        director_certs,
        launcher=LocalLauncher(),
        supervise_seconds=0.2,
        aggregator={"listen_address": "127.0.0.1", "ports": free_ports(2)},
        dashboard={"address": "127.0.0.1:0"},
        health_check_seconds=0.5,
    ) as running:
        try:
            yield running
        finally:
            for experiment in running.server.state.experiments():
                if experiment.aggregator_pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(experiment.aggregator_pid, signal.SIGKILL)


@contextlib.contextmanager
def envoys_running(folder: Path, certs: CertsLayout, port: int) -> Iterator[list[EnvoyProcess]]:
    """One `envoy start` process per site while inside; they and their collaborators stopped after."""
    envoys = []
    try:
        for name in ENVOYS:
            config = write_envoy_config(
                folder / name, certs, port, shard={"description": f"{name}'s digits"}
            )
            envoy = EnvoyProcess(name, config, folder / name / "envoy.log")
            envoy.start()
            envoys.append(envoy)
        yield envoys
    finally:
        for envoy in envoys:
            if envoy.alive():
                envoy.terminate()
            stop_collaborators(folder / envoy.name / "state")


def collaborator_group(state_dir: Path, experiment_id: str) -> int | None:
    """The process group of a site's collaborator for an experiment, once its envoy started it."""
    if not (state_dir / "envoy.sqlite").exists():
        return None
    state = EnvoyState.open(state_dir, exclusive=False)
    try:
        return next(
            (e.pid for e in state.experiments() if e.experiment_id == experiment_id and e.pid),
            None,
        )
    finally:
        state.close()


def wait_for(check: Callable[[], Any], what: str) -> Any:
    """Poll `check` until it returns something true, bounded in time and count."""
    deadline = time.monotonic() + WAIT_SECONDS
    for _ in range(int(WAIT_SECONDS / 0.2)):
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def test_the_dashboard_follows_a_running_experiment_live(
    tmp_path: Path, director: Director, browser: Any
) -> None:
    """Refused without a login; logged in, the experiment's page shows it running, and its
    progress and chart advance without a reload while a held-up site is let go; the chart has a
    line per site beside the global model's."""

    # Read in one script call: the page redraws every 2 s, so elements held across calls go stale.
    def text(selector: str) -> str:
        found = browser.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            selector,
        )
        return str(found)

    def points() -> int:
        return int(
            browser.execute_script("return document.querySelectorAll('circle.point').length;")
        )

    plan = yaml.safe_dump(
        submitted_plan(
            federation={"rounds": ROUNDS},
            aggregator={"quit_grace_seconds": 10},
            connection={"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
        )
    )
    assert director.server.dashboard is not None
    base = f"https://localhost:{director.server.dashboard.port}"
    secret = TokenStore(director.server.config.state_dir).issue("ada")
    with envoys_running(tmp_path / "sites", director.certs, director.port):
        wait_for(
            lambda: sum(e.online for e in director.server.state.envoys()) == len(ENVOYS),
            "the three envoys online",
        )
        experiment_id = (
            director.stub("ada")
            .SubmitExperiment(iter([pb.SubmitChunk(plan_yaml=plan)]), timeout=60)
            .experiment_id
        )
        # Unauthenticated: the experiment's page is not served, the login page is.
        browser.get(f"{base}/experiments/{experiment_id}")
        wait_for(lambda: browser.current_url == f"{base}/login", "the redirect to /login")
        browser.get(f"{base}/api/experiments")
        assert "log in first" in browser.find_element(By.TAG_NAME, "body").text
        # carol's collaborator held (SIGSTOP) once started: with wait_for_all no round closes.
        carol = wait_for(
            lambda: collaborator_group(tmp_path / "sites" / "carol" / "state", experiment_id),
            "carol's collaborator to start",
        )
        os.killpg(carol, signal.SIGSTOP)
        try:
            browser.get(f"{base}/login")
            browser.find_element(By.ID, "token").send_keys(secret)
            browser.find_element(By.ID, "log-in").click()
            row = wait_for(lambda: text(f'tr[data-id="{experiment_id}"]'), "the list's row")
            assert "ada" in row
            browser.execute_script(
                "document.querySelector(arguments[0]).click();", f'tr[data-id="{experiment_id}"] a'
            )
            wait_for(lambda: text("#state") == "running", "the experiment's page, running")
            browser.execute_script("window.notReloaded = true;")
            before = text("#progress")
            points_before = points()
            assert before.startswith("round ") and before != f"round {ROUNDS} of {ROUNDS}"
        finally:
            os.killpg(carol, signal.SIGCONT)

        def advanced() -> bool:
            progress = text("#progress")
            done = int(progress.split()[1]) if progress.startswith("round ") else -1
            return done >= min(ROUNDS, int(before.split()[1]) + 2) and points() > points_before

        wait_for(advanced, "the progress and the chart to advance")
        assert browser.execute_script("return window.notReloaded === true;")
        # Heartbeats every 0.5 s: on a loaded machine one can be late, so a site may read
        # offline for a moment; the page must show all three online again, without a reload.
        wait_for(
            lambda: all(f"{name} online" in text("#sites") for name in ENVOYS),
            "every site online on the page",
        )
        assert text('.chart[data-metric="accuracy"] h4') == "accuracy"
        # Each site has its own line in the chart, named in its legend, beside the global model's.
        for name in ENVOYS:
            lines = browser.execute_script(
                "return document.querySelectorAll(arguments[0]).length;",
                f'.chart[data-metric="accuracy"] polyline[data-site="{name}"]',
            )
            assert lines >= 1, name
            assert name in text(f'.chart[data-metric="accuracy"] .legend [data-site="{name}"]')
        assert "global model" in text('.chart[data-metric="accuracy"] .legend [data-site=""]')
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
        wait_for(
            lambda: text("#progress") == f"round {ROUNDS} of {ROUNDS}",
            "the last round on the page",
        )
