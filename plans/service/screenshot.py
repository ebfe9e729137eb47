"""A screenshot of the director's dashboard in headless Chromium, for `make demo-service`.

A browser, not an HTTP client, because the picture is what a person sees: the charts are drawn
by the page's own script. Chromium trusts exactly the director's key (its SPKI pin), never any
certificate; it logs in with a dashboard token as a person does. The dashboard's browser test
(tests/test_dashboard_browser.py) starts its Chromium and logs in with the same functions.

    python -m foedus.plans.service.screenshot --url https://localhost:50359/ --token-file FILE \\
        --certificate certs/aggregator/aggregator.crt --experiment ID --rounds 2 -o dashboard.png

Exit 0 when the PNG is saved, and also when Debian's `chromium` or `chromium-driver` is missing
(one line says the screenshot is skipped); 1 when the page did not show the closed rounds in time;
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from foedus.pki.errors import PkiError
from foedus.pki.files import read_certificate
from foedus.pki.requests import spki_pin

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1280, 960)  # the page's viewport: the PNG's width and height in pixels
WAIT_SECONDS = 120.0
POLL_SECONDS = 0.2

T = TypeVar("T")


class BrowserUnavailableError(Exception):
    """Headless Chromium cannot run here; the message says what is missing."""


class PageError(Exception):
    """The dashboard did not show what was waited for in time; the message names it."""


@contextmanager
def headless_chromium(
    certificate: Path, profile_dir: Path, window: tuple[int, int] = WINDOW
) -> Iterator[WebDriver]:
    """Debian's Chromium through chromium-driver, trusting only `certificate`'s key; quit after."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            raise BrowserUnavailableError(
                f"{path} is missing (apt-get install chromium chromium-driver)"
            )
    profile_dir.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--hide-scrollbars",  # the picture is of the page, not of a scroll bar
        f"--window-size={window[0]},{window[1]}",
        f"--user-data-dir={profile_dir}",  # the SPKI list below is honoured only with one
        f"--ignore-certificate-errors-spki-list={spki_pin(read_certificate(certificate))}",
    ):
        options.add_argument(argument)
    try:
        # Its log under the profile: the driver's command line then names it, as the demo's
        # clean-up looks for (the browser's names the profile, from --user-data-dir).
        service = Service(CHROMEDRIVER, log_output=str(profile_dir / "chromedriver.log"))
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as error:  # the browser cannot start here: say why
        raise BrowserUnavailableError(
            f"{type(error).__name__}: {error.msg or error}".splitlines()[0]
        ) from None
    try:
        # The window's size less the browser's frame is not the page's: the viewport is set itself.
        width, height = window
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        driver.quit()


def wait_until(check: Callable[[], T | None], what: str, seconds: float = WAIT_SECONDS) -> T:
    """Poll `check` until it returns something true, bounded in time and count."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / POLL_SECONDS) + 1):
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    raise PageError(f"timed out after {seconds:g} s waiting for {what}")


def page_text(driver: WebDriver, selector: str) -> str:
    """An element's text, read in one script call (the page redraws, so held elements go stale)."""
    found = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
        selector,
    )
    return str(found)


def chart_points(driver: WebDriver) -> int:
    """How many points the experiment page's charts show."""
    return int(driver.execute_script("return document.querySelectorAll('circle.point').length;"))


def log_in(driver: WebDriver, base: str, token: str, seconds: float = WAIT_SECONDS) -> None:
    """Paste `token` on the login page, as a person does, and wait to be let in."""
    login = urljoin(base, "/login")
    driver.get(login)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "log-in").click()
    wait_until(
        lambda: driver.current_url != login or page_text(driver, "#error"), "the login", seconds
    )
    refused = page_text(driver, "#error")
    if driver.current_url == login:
        raise PageError(f"the dashboard refused the token: {refused}")


def rounds_shown(driver: WebDriver) -> int:
    """How many closed rounds the experiment page shows: its "round r of R", once charts are drawn."""
    words = page_text(driver, "#progress").split()
    closed = words[1] if len(words) == 4 and words[0] == "round" else ""
    return int(closed) if closed.isdigit() and chart_points(driver) > 0 else 0


def screenshot(
    driver: WebDriver,
    base: str,
    experiment_id: str,
    output: Path,
    *,
    rounds: int = 1,
    seconds: float = WAIT_SECONDS,
) -> str:
    """Save the experiment's page once it shows `rounds` closed rounds; its state and progress."""
    driver.get(urljoin(base, f"/experiments/{experiment_id}"))
    wait_until(
        lambda: rounds_shown(driver) >= rounds, f"{rounds} closed round(s) on the page", seconds
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(output)):
        raise PageError(f"{output}: Chromium did not save the screenshot")
    return f"{page_text(driver, '#state')}, {page_text(driver, '#progress')}"


def build_parser() -> argparse.ArgumentParser:
    """The command line: where the dashboard is, how to log in and trust it, where the PNG goes."""
    parser = argparse.ArgumentParser(
        prog="python -m foedus.plans.service.screenshot",
        description="Save a PNG of an experiment's dashboard page in headless Chromium, once it "
        "shows --rounds closed rounds. Skipped, with one line and exit 0, where Debian's chromium "
        "or chromium-driver is missing.",
    )
    parser.add_argument("--url", required=True, help="the dashboard, https://HOST:PORT/")
    parser.add_argument(
        "--token-file",
        type=Path,
        required=True,
        help="a dashboard token, from `director dashboard-token`",
    )
    parser.add_argument(
        "--certificate",
        type=Path,
        required=True,
        help="the director's certificate: Chromium trusts its key and nothing else",
    )
    parser.add_argument("--experiment", required=True, help="the experiment's id")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="closed rounds the page must show before the picture (default: 1)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument(
        "--timeout",
        type=float,
        default=WAIT_SECONDS,
        help=f"seconds to wait for the page (default: {WAIT_SECONDS:g})",
    )
    return parser


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Take the screenshot; returns the exit code (0 saved or skipped, 1 failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        print(f"screenshot: --rounds: {args.rounds} is not a count >= 1", file=sys.stderr)
        return 2
    if urlsplit(args.url).scheme != "https":
        print(f"screenshot: --url: {args.url!r} is not an https:// URL", file=sys.stderr)
        return 2
    try:
        token = args.token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        print(f"screenshot: {args.token_file}: cannot read the token: {error}", file=sys.stderr)
        return 2
    # Stopped by the demo's clean-up: the browser and its driver are quit on the way out.
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        return _take(args, token)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _take(args: argparse.Namespace, token: str) -> int:
    profile = args.output.parent / f".{args.output.stem}-chromium"
    shutil.rmtree(profile, ignore_errors=True)
    try:
        with headless_chromium(args.certificate, profile) as driver:
            log_in(driver, args.url, token, args.timeout)
            shown = screenshot(
                driver,
                args.url,
                args.experiment,
                args.output,
                rounds=args.rounds,
                seconds=args.timeout,
            )
    except BrowserUnavailableError as error:
        print(f"screenshot: skipped, headless Chromium unavailable: {error}")
        return 0
    except PkiError as error:
        print(f"screenshot: --certificate: {error}", file=sys.stderr)
        return 2
    except (PageError, WebDriverException) as error:
        reason = str(error.msg if isinstance(error, WebDriverException) else error).strip()
        print(f"screenshot: {reason.splitlines()[0] if reason else error!r}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    print(f"screenshot: the dashboard ({shown}) saved to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
