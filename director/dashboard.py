"""The director's web dashboard: a JSON API and three static pages that poll it, over HTTPS.

Authentication: a person's dashboard token (see `foedus.director.tokens`), sent as the
`foedus_session` cookie a browser gets from logging in (HttpOnly, Secure, SameSite=Strict), or as
`Authorization: Bearer <token>` by scripts. The token names a person, and director.yaml's roster
gives the role, exactly as a certificate's common name does on the gRPC side: users see their own
experiments, admins all, envoys nothing. Everything is read through `DirectorService`, so the
dashboard applies the gRPC side's rules and never a copy of them. The pages carry no data: they are
served only to a logged-in person, and their script reads the API every few seconds.

Errors are `{"error": "..."}` with the status of the one table, `foedus.refusals.http`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from foedus.director.fields import checked_id
from foedus.director.identity import PEOPLE, Caller
from foedus.director.launcher import LOG_FILE
from foedus.director.people import ExperimentView, PrivacyBudget
from foedus.director.records import Envoy
from foedus.director.service import DirectorService
from foedus.director.tokens import TokenStore
from foedus.history.rows import MetricsRow, RowError, TaskMetrics
from foedus.privacy.site_budget import DP_DELTA, DP_MAX_EPSILON
from foedus.processes.children import log_tail
from foedus.refusals.errors import (
    AuthenticationError,
    InvalidRequestError,
    LimitExceededError,
    RefusalError,
    StorageError,
)
from foedus.refusals.http import http_status

logger = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parent / "web"
COOKIE = "foedus_session"
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 32 * 1024
MAX_TOKEN_CHARS = 256
MAX_LOGIN_BYTES = 4096  # a login's body: {"token": "..."}, read no further
GLOBAL_TASK = "aggregated_model_validation"
# The metrics.jsonl tasks, as a person reads them on a chart.
TASK_LABELS = {
    GLOBAL_TASK: "global model",
    "train": "sites' training (mean)",
    "locally_tuned_model_validation": "sites' tuned models (mean)",
}
# A site's line of a task, when a chart shows several tasks.
SITE_TASK_LABELS = {
    GLOBAL_TASK: "global model",
    "train": "training",
    "locally_tuned_model_validation": "tuned model",
}
# A site's DP-SGD delta and cap: the same every round, said by its budget's line, not a chart.
UNCHARTED = frozenset({DP_DELTA, DP_MAX_EPSILON})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def create_app(
    service: DirectorService, tokens: TokenStore, *, clock: Callable[[], float] = time.time
) -> FastAPI:
    """The dashboard's application over `service`, people identified by `tokens`."""
    # The schema is served by `_Routes.schema`, behind the token as every other route.
    app = FastAPI(
        title="foedus director dashboard", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    app.middleware("http")(_security_headers)
    app.add_exception_handler(RefusalError, _refused)
    app.add_exception_handler(StorageError, _refused)
    app.add_exception_handler(Exception, _failed)
    routes = _Routes(service, tokens, clock)
    app.get("/login", include_in_schema=False)(_login_page)
    app.post("/api/session")(routes.log_in)
    app.delete("/api/session")(_log_out)
    app.get("/api/me")(routes.me)
    app.get("/api/experiments")(routes.experiments)
    app.get("/api/experiments/{experiment_id}")(routes.experiment)
    app.get("/api/envoys")(routes.envoys)
    app.get("/openapi.json", include_in_schema=False)(routes.schema)
    app.get("/", include_in_schema=False)(routes.index)
    app.get("/experiments/{experiment_id}", include_in_schema=False)(routes.experiment_page)
    return app


class _Routes:
    """The endpoints that need the director: each identifies its caller first."""

    def __init__(
        self, service: DirectorService, tokens: TokenStore, clock: Callable[[], float]
    ) -> None:
        self.service = service
        self.tokens = tokens
        self.clock = clock

    def person(self, token: str) -> Caller:
        """The person a token was issued to, if director.yaml still names them user or admin."""
        name = self.tokens.name_of(token) if len(token) <= MAX_TOKEN_CHARS else None
        if name is None:
            raise AuthenticationError("unknown or revoked dashboard token; ask for a new one")
        caller = self.service.roster.identify([name], None)  # no certificate: the token's person
        caller.require("the dashboard", *PEOPLE)
        return caller

    def identify(self, request: Request) -> Caller:
        """The caller, from the Authorization header or else the session cookie."""
        header = request.headers.get("authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
            return self.person(value.strip())
        token = request.cookies.get(COOKIE, "")
        if not token:
            raise AuthenticationError(
                "log in first: the dashboard needs a token from 'director dashboard-token'"
            )
        return self.person(token)

    async def log_in(self, request: Request) -> Response:
        """Exchange a token for the session cookie."""
        data = b""
        async for piece in request.stream():
            data += piece
            if len(data) > MAX_LOGIN_BYTES:
                raise LimitExceededError(f"a login is at most {MAX_LOGIN_BYTES} bytes of JSON")
        try:
            body = json.loads(data)
        except ValueError:
            raise InvalidRequestError('the body must be JSON: {"token": "..."}') from None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise InvalidRequestError('the body must be JSON: {"token": "..."}')
        token = token.strip()
        caller = self.person(token)
        response = JSONResponse(_person(caller))
        response.set_cookie(COOKIE, token, httponly=True, secure=True, samesite="strict", path="/")
        logger.info("dashboard: %s logged in", caller.name)
        return response

    def me(self, request: Request) -> dict[str, Any]:
        """Who is logged in."""
        return _person(self.identify(request))

    def experiments(self, request: Request) -> dict[str, Any]:
        """The caller's experiments (an admin's: all), newest first."""
        caller = self.identify(request)
        now = self.clock()
        views = self.service.people.experiments(caller)
        return {"experiments": [_summary(view, now) for view in reversed(views)]}

    def experiment(self, request: Request, experiment_id: str) -> dict[str, Any]:
        """One experiment: its summary, sites, metric series and the end of its log."""
        caller = self.identify(request)
        view = self.service.people.experiment(caller, checked_id("experiment_id", experiment_id))
        rows = self.service.people.metric_rows(caller, experiment_id, 0)
        return {
            **_summary(view, self.clock()),
            "charts": metric_series(rows),
            "secure_rounds": secure_rounds(rows),
            "log_tail": _log_tail(self.service.folders.folder(experiment_id) / LOG_FILE),
        }

    def envoys(self, request: Request) -> dict[str, Any]:
        """Every registered envoy: shard, last heartbeat, online, active experiments."""
        caller = self.identify(request)
        now = self.clock()
        return {"envoys": [_envoy(e, ids, now) for e, ids in self.service.people.envoys(caller)]}

    def schema(self, request: Request) -> dict[str, Any]:
        """The API's OpenAPI schema, for a logged-in person."""
        self.identify(request)
        return request.app.openapi()  # type: ignore[no-any-return]

    def index(self, request: Request) -> Response:
        """The experiments and envoys page, for a logged-in person."""
        self.identify(request)
        return FileResponse(WEB / "index.html")

    def experiment_page(self, request: Request, experiment_id: str) -> Response:
        """One experiment's page, for a logged-in person (its script asks for the data)."""
        self.identify(request)
        return FileResponse(WEB / "experiment.html")


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


async def _refused(request: Request, error: Exception) -> Response:
    """A refusal as `{"error": ...}` with its status; a page asked for without a login: /login."""
    code = http_status(error)
    if isinstance(error, StorageError):
        logger.error("dashboard %s: %s", request.url.path, error)
        return JSONResponse({"error": "the director cannot read its data now"}, code)
    if code == 401 and not request.url.path.startswith(("/api/", "/openapi.json")):
        return RedirectResponse("/login", 303)
    logger.info("dashboard %s refused (%d): %s", request.url.path, code, error)
    return JSONResponse({"error": str(error)}, code)


async def _failed(request: Request, error: Exception) -> Response:
    """A bug, answered 500 in the API's shape (uvicorn logs its traceback)."""
    return JSONResponse({"error": "internal error; the director's log has the details"}, 500)


def _login_page() -> Response:
    return FileResponse(WEB / "login.html")


def _log_out() -> Response:
    """Forget the session cookie (the token itself stays valid until revoked)."""
    response = JSONResponse({"status": "logged out"})
    response.delete_cookie(COOKIE, httponly=True, secure=True, samesite="strict", path="/")
    return response


def metric_series(rows: list[str]) -> list[dict[str, Any]]:
    """metrics.jsonl rows as charts: one per metric; per task, a line of the weighted mean and a
    line per site (from the rows' ``sites``); a point per round. Malformed parts are skipped, and
    so are a site's delta and cap (constants, shown with its budget: `site_budgets`)."""
    charts: dict[str, dict[tuple[str, str | None], list[list[float]]]] = {}
    for line in rows:
        try:
            row = MetricsRow.parse(line)
        except RowError:
            continue
        if row.round_number is None:
            continue
        measured: list[tuple[str | None, TaskMetrics]] = [(None, row.metrics)]
        measured += sorted(row.sites.items())
        for site, tasks in measured:
            for task, values in tasks.items():
                for metric, value in values.items():
                    if value is None or metric in UNCHARTED:
                        continue
                    # x: rounds of training behind the model measured. The global model is
                    # validated as a round begins; the sites' metrics are that round's own.
                    x = row.round_number + (0 if task == GLOBAL_TASK else 1)
                    points = charts.setdefault(metric, {}).setdefault((task, site), [])
                    points.append([x, value])
    return [
        {
            "metric": metric,
            "lines": [
                {
                    "task": task,
                    "site": site,
                    "label": _line_label(task, site, len({task for task, _ in lines}) > 1),
                    "points": lines[(task, site)],
                }
                # The means first, then each site's lines.
                for task, site in sorted(lines, key=lambda key: (key[1] or "", key[0]))
            ],
        }
        for metric, lines in sorted(charts.items())
    ]


def secure_rounds(rows: list[str]) -> list[dict[str, Any]]:
    """metrics.jsonl's secure rounds, one entry each: its number (from 1, as people count), each
    step's time and who dropped out in it, and why it closed untrained ("" if it did not)."""
    rounds = []
    for line in rows:
        try:
            row = MetricsRow.parse(line)
        except RowError:
            continue
        if row.round_number is None or not row.secure:
            continue
        rounds.append(
            {
                "round": row.round_number + 1,
                "stages": [stage.to_dict() for stage in row.stages],
                "untrained": row.untrained,
            }
        )
    return rounds


def _line_label(task: str, site: str | None, several_tasks: bool) -> str:
    """A line's name in a chart's legend: the task's mean, or a site (and its task if need be)."""
    if site is None:
        return TASK_LABELS.get(task, task)
    return f"{site}, {SITE_TASK_LABELS.get(task, task)}" if several_tasks else site


def _person(caller: Caller) -> dict[str, Any]:
    return {"name": caller.name, "role": caller.role.value}


def _summary(view: ExperimentView, now: float) -> dict[str, Any]:
    experiment = view.experiment
    return {
        "id": experiment.experiment_id,
        "name": experiment.name,
        "owner": experiment.owner,
        "state": experiment.state.value,
        "reason": experiment.reason,
        "rounds": experiment.rounds,
        "rounds_completed": view.rounds_completed,
        "queue_position": view.queue_position,
        "submitted_at": experiment.submitted_at,
        "age_seconds": max(0.0, now - experiment.submitted_at),
        "started_at": experiment.started_at or None,
        "ended_at": experiment.ended_at or None,
        "secure": view.secure,
        "privacy": _privacy(view.privacy),
        "site_budgets": _site_budgets(view),
        "sites": [
            {
                "site": site.site,
                "state": site.state.value if site.state else None,
                "online": site.online,
                "exit_code": site.exit_code,
                "reason": site.reason,
            }
            for site in view.sites
        ],
    }


def _privacy(budget: PrivacyBudget | None) -> dict[str, Any] | None:
    """A DP experiment's settings and the epsilon spent (`max_epsilon` None: no cap); None: off."""
    if budget is None:
        return None
    settings = budget.settings
    return {
        "clip": settings.clip,
        "noise_multiplier": settings.noise_multiplier,
        "delta": settings.delta,
        "max_epsilon": settings.max_epsilon,
        "epsilon": budget.epsilon if math.isfinite(budget.epsilon) else None,
    }


def _site_budgets(view: ExperimentView) -> list[dict[str, Any]]:
    """Each site's own privacy budget (DP-SGD at the site) as its latest training round reported
    it: site, round (from 1), epsilon, delta and its cap (None: no cap); sites without one left
    out."""
    return [
        {
            "site": site.site,
            "round": site.budget_round,
            "epsilon": site.budget.epsilon,
            "delta": site.budget.delta,
            "max_epsilon": site.budget.max_epsilon,
        }
        for site in view.sites
        if site.budget is not None
    ]


def _envoy(envoy: Envoy, experiments: tuple[str, ...], now: float) -> dict[str, Any]:
    shard = envoy.shard
    return {
        "name": envoy.name,
        "online": envoy.online,
        "version": envoy.version,
        "last_seen": envoy.last_seen,
        "seconds_since_heartbeat": max(0.0, now - envoy.last_seen),
        "shard": {
            "description": shard.description,
            "train_samples": shard.train_samples,
            "valid_samples": shard.valid_samples,
            "labels": dict(shard.labels),
        },
        "experiments": list(experiments),
    }


def _log_tail(path: Path) -> list[str]:
    """The last lines of a log (none yet: empty)."""
    try:
        return log_tail(path, LOG_TAIL_LINES, LOG_TAIL_BYTES)
    except OSError as error:
        raise StorageError(f"{path}: cannot read: {error.strerror}") from None
