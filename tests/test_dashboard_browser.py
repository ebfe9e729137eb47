"""The dashboard in a real headless Chromium during a real run: a director, its aggregator, and
three real envoy processes running the sites' collaborators.

Chromium trusts exactly the director's key (its SPKI pin), not any certificate. Debian's
`chromium` and `chromium-driver` are needed: a machine without them skips with the reason, CI
fails instead (`.ci/run` installs them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from foedus.director.launcher import LocalLauncher
from foedus.director.tokens import TokenStore
from foedus.envoy.state import EnvoyState
from foedus.pki.layout import CertsLayout
from foedus.plans.service import screenshot as screenshot_module
from foedus.plans.service.screenshot import (
    CHROMEDRIVER,
    CHROMIUM,
    WINDOW,
    BrowserUnavailableError,
    chart_points,
    headless_chromium,
    log_in,
    page_text,
)
from foedus.plans.service.screenshot import main as screenshot_main
from foedus.protos import director_pb2 as pb

from directors import ENVOYS, Director, running_director, submitted_plan
from envoys import EnvoyProcess, stop_collaborators, write_envoy_config
from private_runner import NAME as PRIVATE_RUNNER

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
WAIT_SECONDS = 180
ROUNDS = 6
# Its budget allows all ROUNDS (epsilon 5.98 after 6), so the page shows a bar below its cap.
PRIVACY = {"enabled": True, "clip": 1.0, "noise_multiplier": 2.0, "max_epsilon": 50}
# Each site also trains with DP-SGD (tests/private_runner.py), its own cap in its envoy.yaml:
# all ROUNDS fit in each (epsilon 4.33 after 6), so every site has a bar below its cap.
DP_SGD = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
SITE_CAPS = {"alice": 10.0, "bob": 12.5, "carol": 15.0}
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


@pytest.fixture
def browser(tmp_path: Path, director_certs: CertsLayout) -> Iterator[WebDriver]:
    """Headless Chromium through chromium-driver, trusting only the director's key."""
    try:
        with headless_chromium(director_certs.aggregator_cert, tmp_path / "chromium") as driver:
            yield driver
    except BrowserUnavailableError as error:
        browser_unavailable(str(error))


@pytest.fixture
def director(
    tmp_path: Path, director_certs: CertsLayout, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Director]:
    """A director with real aggregators and its dashboard on loopback, that runs the digits and
    tests/private_runner.py; aggregators killed after."""
    # The runner's folder on PYTHONPATH, for the aggregators, envoys and collaborators started.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )
    with running_director(
        tmp_path,
        director_certs,
        launcher=LocalLauncher(),
        supervise_seconds=0.2,
        aggregator={"listen_address": "127.0.0.1", "ports": free_ports(2)},
        dashboard={"address": "127.0.0.1:0"},
        health_check_seconds=0.5,
        runners=["digits", PRIVATE_RUNNER],  # the director imports it, for the initial model
    ) as running:
        try:
            yield running
        finally:
            for experiment in running.server.state.experiments():
                if experiment.aggregator_pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(experiment.aggregator_pid, signal.SIGKILL)


@contextlib.contextmanager
def envoys_running(
    folder: Path, certs: CertsLayout, port: int, **site_keys: Callable[[str], Any]
) -> Iterator[list[EnvoyProcess]]:
    """One `envoy start` process per site while inside; they and their collaborators stopped
    after. `site_keys`: envoy.yaml keys, each value made from the site's name."""
    envoys = []
    try:
        for name in ENVOYS:
            keys = {key: value(name) for key, value in site_keys.items()}
            config = write_envoy_config(
                folder / name, certs, port, shard={"description": f"{name}'s digits"}, **keys
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


def submit_once_envoys_online(director: Director, plan: str) -> str:
    """ada's experiment id, submitted once every envoy is online (so each site takes part)."""
    wait_for(
        lambda: sum(e.online for e in director.server.state.envoys()) == len(ENVOYS),
        "the three envoys online",
    )
    return str(
        director.stub("ada")
        .SubmitExperiment(iter([pb.SubmitChunk(plan_yaml=plan)]), timeout=60)
        .experiment_id
    )


def test_the_dashboard_follows_a_running_experiment_live(
    tmp_path: Path, director: Director, browser: WebDriver
) -> None:
    """Refused without a login; logged in, the experiment's page shows it running, and its
    progress and chart advance without a reload while a held-up site is let go; the chart has a
    line per site beside the global model's; the run has differential privacy (a cap above its
    rounds' epsilon): its tag, and its budget bar filled up to the epsilon spent, the cap on it;
    each site trains with DP-SGD under its own cap: a row per site, its bar and its cap."""

    def text(selector: str) -> str:
        return page_text(browser, selector)

    def points() -> int:
        return chart_points(browser)

    plan = yaml.safe_dump(
        submitted_plan(
            federation={"rounds": ROUNDS},
            aggregator={"quit_grace_seconds": 10},
            connection={"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
            differential_privacy=PRIVACY,
            runner={"name": PRIVATE_RUNNER, "settings": {"dp_sgd": DP_SGD}},
        )
    )
    assert director.server.dashboard is not None
    base = f"https://localhost:{director.server.dashboard.port}"
    secret = TokenStore(director.server.config.state_dir).issue("ada")
    with envoys_running(
        tmp_path / "sites",
        director.certs,
        director.port,
        runners=lambda _: [PRIVATE_RUNNER],
        runner_settings=lambda name: {"dp_sgd": {**DP_SGD, "max_epsilon": SITE_CAPS[name]}},
    ):
        experiment_id = submit_once_envoys_online(director, plan)
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
            log_in(browser, base, secret)
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
        assert text("#dp-tag") == "differential privacy"
        # A plain run's tag stays hidden (a class's display once overrode `hidden`).
        assert not browser.find_element(By.ID, "secure-tag").is_displayed()
        budget = text("#budget-text")
        assert budget.startswith("epsilon ") and " of 50 at delta 1e-05 after " in budget, budget
        spent, cap = browser.execute_script(
            "const bar = document.querySelector('#budget');"
            "return [bar.querySelector('.spent').style.width, bar.querySelector('.cap').style.left];"
        )
        assert float(spent.rstrip("%")) > 0 and cap == "90.9%", (spent, cap)
        check_site_budgets(browser)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
        wait_for(
            lambda: text("#progress") == f"round {ROUNDS} of {ROUNDS}",
            "the last round on the page",
        )


def check_site_budgets(browser: WebDriver) -> None:
    """Each site's own budget on the page: a row with its line, and a bar on one scale (the
    largest cap x 1.1) filled up to its epsilon, its own cap drawn on it."""

    def sites() -> list[str]:
        return list(
            browser.execute_script(
                "return [...document.querySelectorAll('#site-budgets tbody tr')]"
                ".map((row) => row.dataset.site);"
            )
        )

    wait_for(lambda: sites() == sorted(SITE_CAPS), "a budget row per site")
    for name, cap in SITE_CAPS.items():
        line = page_text(browser, f'#site-budgets tr[data-site="{name}"] .budget-text')
        assert line.startswith("epsilon ") and f" of {cap:g} at delta 1e-05" in line, line
        spent, drawn = browser.execute_script(
            "const bar = document.querySelector(arguments[0]);"
            "return [bar.querySelector('.spent').style.width, bar.querySelector('.cap').style.left];",
            f'#site-budgets tr[data-site="{name}"] .budget',
        )
        position = cap / (max(SITE_CAPS.values()) * 1.1) * 100
        assert 0 < float(spent.rstrip("%")) < position, (name, spent, position)
        assert drawn == f"{position:.1f}%", (name, drawn)
    # Its epsilon charted a line per site; its delta and cap, constants, are not charts.
    charts = browser.execute_script(
        "return [...document.querySelectorAll('.chart')].map((chart) => chart.dataset.metric);"
    )
    assert "dp_epsilon" in charts and not {"dp_delta", "dp_max_epsilon"} & set(charts), charts


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature, every chunk's CRC and its end."""
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), f"{path} is not a PNG"
    offset, kinds, size = 8, [], (0, 0)
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: chunk {kind!r} fails its CRC"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        kinds.append(kind)
        offset += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds, kinds
    return size


def test_the_demos_screenshot_script_saves_the_page_of_a_run(
    tmp_path: Path, director: Director, capsys: pytest.CaptureFixture[str]
) -> None:
    """plans/service/screenshot.py, logged in with a token and trusting the director's key, saves
    a PNG of the viewport's size once two rounds closed; a wrong token saves nothing (exit 1)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            browser_unavailable(f"{path} is missing (apt-get install chromium chromium-driver)")
    assert director.server.dashboard is not None
    url = f"https://localhost:{director.server.dashboard.port}/"
    plan = yaml.safe_dump(submitted_plan(federation={"rounds": 2}))
    (tmp_path / "token").write_text(TokenStore(director.server.config.state_dir).issue("ada"))
    (tmp_path / "wrong").write_text("not-a-token")
    output = tmp_path / "shots" / "dashboard.png"

    def shoot(token_file: Path, experiment_id: str) -> int:
        argv = ["--url", url, "--token-file", str(token_file), "--experiment", experiment_id]
        argv += ["--certificate", str(director.certs.aggregator_cert), "-o", str(output)]
        return screenshot_main([*argv, "--rounds", "2", "--timeout", str(WAIT_SECONDS)])

    with envoys_running(tmp_path / "sites", director.certs, director.port):
        experiment_id = submit_once_envoys_online(director, plan)
        assert shoot(tmp_path / "wrong", experiment_id) == 1
        assert "refused the token" in capsys.readouterr().err
        assert not output.exists()
        code = shoot(tmp_path / "token", experiment_id)
        printed = capsys.readouterr().out
        if "skipped" in printed:
            browser_unavailable(printed.strip())
        assert code == 0, printed
    assert f"round 2 of 2) saved to {output}" in printed
    assert png_size(output) == WINDOW
    assert not (output.parent / ".dashboard-chromium").exists()


def test_the_screenshot_script_skips_without_a_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Chromium missing: one line says the screenshot is skipped, exit 0, no PNG (the demo goes on)."""
    monkeypatch.setattr(screenshot_module, "CHROMIUM", str(tmp_path / "no-chromium"))
    (tmp_path / "token").write_text("a-token")
    output = tmp_path / "dashboard.png"
    argv = ["--url", "https://localhost:1/", "--token-file", str(tmp_path / "token")]
    argv += ["--certificate", str(tmp_path / "absent.crt"), "--experiment", "x", "-o", str(output)]
    assert screenshot_main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith("screenshot: skipped, "), printed
    assert "no-chromium is missing" in printed[0]
    assert not output.exists()
