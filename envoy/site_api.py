"""The site's HTTP API on the envoy: start, watch and stop collaborators without a terminal.

FastAPI (validation and the OpenAPI page at /api/docs) served by uvicorn in a thread of the
envoy's own process (`SiteApiServer`), bound to 127.0.0.1 unless envoy.yaml's `site_api.host`
says otherwise. Every request, the OpenAPI page and schema included, carries the bearer token
of STATE_DIR/site_api.token (made 0600 on first start, `ensure_token`), compared in constant
time: a token rather than mutual TLS because a site's certificate is a client certificate
(its collaborators'), and curl or a browser on the site's host can send a header where it
cannot easily present one. The endpoints only translate HTTP to `Site`'s plain-Python calls;
every failure is `{"error": "..."}` with the status code of `foedus.refusals.http` (the one table).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from foedus.durable.files import replace_file
from foedus.envoy.errors import EnvoyError, StateError, UnknownExperimentError
from foedus.envoy.progress import ProgressBook, describe
from foedus.envoy.site import LOG_FILE, Site, review
from foedus.envoy.site_plan import EXPERIMENT_ID, RefusedPlanError
from foedus.plans.reader import cut, shown, values_hidden
from foedus.processes.children import log_tail
from foedus.protos.channel import host_port
from foedus.refusals.errors import InvalidRequestError
from foedus.refusals.http import http_status

logger = logging.getLogger(__name__)

TOKEN_FILE = "site_api.token"
MAX_PLAN_BYTES = 1024 * 1024  # a plan is a few KiB; a bigger body is refused before reading it
MAX_TAIL_LINES = 10_000
_LOG_TAIL_BYTES = 4 * 1024 * 1024
_START_SECONDS = 30.0


class TokenError(EnvoyError):
    """The site API's token file cannot be made, read or trusted; the message names it."""


class BadRequestError(EnvoyError, InvalidRequestError):
    """A request the API understood but cannot act on (a plan file that cannot be read)."""


def ensure_token(path: Path) -> str:
    """The token in `path`, made (random, mode 0600) if missing; `TokenError` if unsafe."""
    try:  # whole or absent after a crash; never over a token another process made first
        replace_file(
            path,
            lambda file: file.write((secrets.token_urlsafe(32) + "\n").encode("ascii")),
            mode=0o600,
            replace=False,
        )
    except FileExistsError:
        pass
    except OSError as error:
        raise TokenError(f"{path}: cannot create the site API's token: {error.strerror}") from None
    else:
        logger.info("site API: made a new token in %s", path)
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not ASCII text"
        raise TokenError(f"{path}: cannot read the site API's token: {reason}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise TokenError(
            f"{path}: the site API's token is readable by others (mode "
            f"{stat.S_IMODE(mode):o}); chmod 600 it"
        )
    if len(token) < 16:
        raise TokenError(f"{path}: the site API's token must be at least 16 characters")
    return token


@dataclass(frozen=True)
class SiteApiContext:
    """What the endpoints act on: the envoy's `Site`, and how to tell the director's state."""

    site: Site
    token: str
    version: str
    director_state: Callable[[], str]
    progress: ProgressBook


class StartRequest(BaseModel):
    """POST /api/collaborators: a plan (its text, or its path on this site) and runner settings."""

    model_config = ConfigDict(extra="forbid")
    plan: str | None = Field(None, description="the plan's YAML text")
    plan_path: str | None = Field(None, description="or: an absolute path to it on this site")
    runner_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="replace the plan's runner.settings keys (envoy.yaml's still win)",
    )
    name: str = Field("", max_length=200, description="a name to list it by")


def create_app(context: SiteApiContext) -> FastAPI:
    """The site API's ASGI app; see the module's docstring."""
    app = FastAPI(
        title="foedus envoy: the site API",
        version=context.version,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    site = context.site
    expected = context.token.encode("ascii")

    @app.middleware("http")
    async def authenticate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", errors="replace"), expected
        ):
            why = "a wrong bearer token" if header else "no bearer token"
            return _error(401, f"{why}: send 'Authorization: Bearer' with site_api.token's text")
        length = request.headers.get("content-length")
        if length is None and "transfer-encoding" in request.headers:
            # A chunked body's size is known only once read: refused unread, as an oversized one.
            return _error(411, "send the body with a Content-Length (not chunked)")
        if not (length or "0").isdigit() or int(length or "0") > 2 * MAX_PLAN_BYTES:
            return _error(413, f"a request body is at most {2 * MAX_PLAN_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> Response:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> Response:
        problems = [
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
        ]
        return _error(422, "; ".join(problems))

    @app.exception_handler(EnvoyError)
    @app.exception_handler(RefusedPlanError)
    async def refused(_request: Request, error: Exception) -> Response:
        code = http_status(error)
        if code >= 500:
            logger.error("site API: %s", error)
        return _error(code, str(error))

    @app.exception_handler(Exception)
    async def crashed(_request: Request, error: Exception) -> Response:
        logger.exception("site API: unexpected error")
        return _error(500, "internal error of the envoy; its log says more")

    @app.get("/api/connect", summary="The envoy is here: its name, director and version.")
    def connect() -> dict[str, Any]:
        return {
            "status": "ok",
            "name": site.name,
            "director": {"target": site.config.director_target, "state": context.director_state()},
            "version": context.version,
        }

    @app.post("/api/collaborators", status_code=201, summary="Start a collaborator here.")
    def start(request: StartRequest) -> dict[str, str]:
        if (request.plan is None) == (request.plan_path is None):
            raise BadRequestError(
                "give the plan as exactly one of 'plan' (its text) or 'plan_path'"
            )
        if request.plan is not None:
            if len(request.plan.encode("utf-8")) > MAX_PLAN_BYTES:
                raise BadRequestError(f"the plan is over {MAX_PLAN_BYTES} bytes")
            experiment = site.start_own(request.plan, request.runner_settings, name=request.name)
        else:
            text = _read_plan(request.plan_path or "")
            with values_hidden():  # its problems name keys, never what the file holds
                experiment = site.start_own(text, request.runner_settings, name=request.name)
        return {"uuid": experiment.experiment_id}

    @app.get("/api/collaborators", summary="Every collaborator this envoy runs or ran.")
    def listing() -> dict[str, list[dict[str, Any]]]:
        return {"collaborators": [_describe(e.experiment_id) for e in site.state.experiments()]}

    def _describe(experiment_id: str) -> dict[str, Any]:
        experiment = site.state.experiment(experiment_id)
        folder = site.folder(experiment_id)
        progress = context.progress.read(experiment_id, folder / LOG_FILE)
        return describe(experiment, progress, folder)

    @app.get("/api/collaborators/{uuid}", summary="One collaborator: state, round, metrics.")
    def one(uuid: str) -> dict[str, Any]:
        return _describe(_id(uuid))

    @app.get(
        "/api/collaborators/{uuid}/log",
        response_class=PlainTextResponse,
        summary="The last lines of a collaborator's log.",
    )
    def log(uuid: str, tail: int = Query(100, ge=1, le=MAX_TAIL_LINES)) -> str:
        site.state.experiment(_id(uuid))  # 404 for an unknown one
        return _tail(site.folder(uuid) / LOG_FILE, tail)

    @app.post(
        "/api/collaborators/{uuid}/stop", status_code=202, summary="Stop a running collaborator."
    )
    def stop(uuid: str) -> dict[str, Any]:
        experiment = site.stop_collaborator(_id(uuid))
        return {"uuid": uuid, "state": experiment.state.value, "stopping": True}

    for verb in ("approve", "reject"):
        app.add_api_route(
            f"/api/experiments/{{experiment_id}}/{verb}",
            _review_endpoint(site, approve=verb == "approve"),
            methods=["POST"],
            summary=f"{verb.capitalize()} an experiment waiting for review (review: manual).",
        )
    return app


class ReviewRequest(BaseModel):
    """POST /api/experiments/{id}/approve|reject: an optional reason, kept and sent on."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=1000)


def _review_endpoint(site: Site, *, approve: bool) -> Callable[..., dict[str, str]]:
    def decide(experiment_id: str, request: ReviewRequest | None = None) -> dict[str, str]:
        reason = request.reason if request is not None else ""
        experiment = review(site.state, _id(experiment_id), approve=approve, reason=reason)
        return {"experiment": experiment_id, "state": experiment.state.value}

    return decide


def _id(experiment_id: str) -> str:
    """An id of the URL: one of the form the envoy keeps, or 404 quoting it cut (never whole)."""
    if not EXPERIMENT_ID.match(experiment_id):
        raise UnknownExperimentError(f"no experiment {shown(experiment_id)} at this envoy")
    return experiment_id


def _error(code: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    return JSONResponse({"error": message}, status_code=code, headers=headers)


def _read_plan(path_text: str) -> str:
    """The plan file a request named: a regular file of at most `MAX_PLAN_BYTES`, else 400.

    Opened without blocking (a FIFO or a device would hold a worker forever) and checked on the
    open descriptor (what is read is what was checked), before a byte is read. A symlink is
    followed, as any reader of a path would: the token's holder could name its target anyway.
    """
    path = Path(path_text)
    if not path.is_absolute():
        raise BadRequestError(f"plan_path {shown(path_text)}: give an absolute path on this site")
    shown_path = cut(repr(path_text), 300)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        reason = error.strerror if isinstance(error, OSError) else "not a usable path"
        raise BadRequestError(f"{shown_path}: cannot read the plan: {reason}") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise BadRequestError(
                f"{shown_path}: not a regular file ({_file_kind(status.st_mode)}); "
                "plan_path names a plan file"
            )
        if status.st_size > MAX_PLAN_BYTES:
            raise BadRequestError(f"{shown_path}: the plan is over {MAX_PLAN_BYTES} bytes")
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(MAX_PLAN_BYTES + 1)
    except OSError as error:
        raise BadRequestError(f"{shown_path}: cannot read the plan: {error.strerror}") from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_PLAN_BYTES:  # it grew since fstat
        raise BadRequestError(f"{shown_path}: the plan is over {MAX_PLAN_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError(f"{shown_path}: the plan is not UTF-8 text") from None


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _tail(path: Path, lines: int) -> str:
    try:
        kept = log_tail(path, lines, _LOG_TAIL_BYTES)
    except OSError as error:
        raise StateError(f"{path}: cannot read: {error.strerror}") from None
    return "".join(f"{line}\n" for line in kept)


class SiteApiServer:
    """uvicorn serving the site API in a thread of the envoy; `start`, then `stop` when done."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        """Nothing is bound before `start`."""
        self.host = host
        self.port = port
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        )
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind (`StateError` if the address cannot be used), serve; the port bound."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
        except OSError as error:
            listener.close()
            raise StateError(
                f"site_api: cannot listen on {host_port(self.host, self.port)}: {error.strerror}"
            ) from None
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [listener]}, name="site-api", daemon=True
        )
        self._thread.start()
        deadline = _START_SECONDS
        while not self._server.started and self._thread.is_alive() and deadline > 0:
            threading.Event().wait(0.05)
            deadline -= 0.05
        if not self._server.started:
            self.stop()
            raise StateError(
                f"site_api: uvicorn did not start on {host_port(self.host, self.port)}"
            )
        return self.port

    def stop(self) -> None:
        """Finish the requests under way and stop serving."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
