"""Record what foedus's command lines and its aggregator's refusals say, to compare a tree with another.

`python tests/behaviour/record.py OUT.json` runs a fixed set of calls (every --help, `make help`,
the bad plans, configurations, certificates and files a user meets, a real 2-round federation, and
refusals over real mutual TLS) and writes, for each: argv, exit code, stdout and stderr, or the
refusal's status and message, normalized (temporary paths, ports, times, durations, uuids, pids
and fingerprints by placeholders; nothing else changed, nothing sorted). `--compare A B` prints
the differences between two recordings and exits 1 if there is any. See tests/behaviour/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # the tests' helpers, imported as the tests import them
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's own notes on this process's stderr


from foedus.pki.ca import utc_now  # noqa: E402
from foedus.pki.layout import CertsLayout  # noqa: E402
from foedus.pki.local import load_signing_ca, setup_local_federation  # noqa: E402
from foedus.pki.requests import Role  # noqa: E402

from conftest import (  # noqa: E402
    AGGREGATOR_DNS,
    AGGREGATOR_HOST,
    AGGREGATOR_IPS,
    COLLABORATORS,
    Identity,
    issue_identity,
)
from directors import make_director_certs, write_config  # noqa: E402
from envoys import write_envoy_config  # noqa: E402
from federation_processes import FederationProcesses, write_plan  # noqa: E402

CALL_SECONDS = 30
WORKERS = 3  # commands run at once: most of a command's time is Python starting  # one command's bound; none of them waits on anything that long
FEDERATION_SECONDS = 120
PLAN_COLLABORATORS = ("alice", "bob")
BIN = Path(sys.executable).parent  # the console scripts of the venv running this


# -- normalizing ------------------------------------------------------------------------------


@dataclass
class Normalizer:
    """Turns what varies from run to run into placeholders; the rest is kept byte for byte."""

    paths: dict[str, str] = field(default_factory=dict)
    ports: set[int] = field(default_factory=set)

    def path(self, real: Path, placeholder: str) -> None:
        """Write `real` (and its resolved form) as `placeholder`."""
        self.paths[str(real)] = placeholder
        self.paths[str(real.resolve())] = placeholder

    PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
        (
            re.compile(
                r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:[.,]\d+)?)?)?(?:Z|[+-]\d\d:?\d\d| ?UTC)?"
            ),
            "<TIME>",
        ),
        (re.compile(r"\b\d\d:\d\d:\d\d(?:[.,]\d+)?\b"), "<TIME>"),
        (
            re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),
            "<UUID>",
        ),
        (re.compile(r"\b(?:[0-9A-Fa-f]{2}:){15,}[0-9A-Fa-f]{2}\b"), "<FINGERPRINT>"),
        (re.compile(r"\b[0-9a-f]{40,}\b"), "<HEX>"),
        (re.compile(r"\b(pid|PID|process) \d+"), r"\1 <PID>"),
        (re.compile(r"(\bpid[\"']?[:=] ?)\d+"), r"\1<PID>"),
        (
            re.compile(
                r"((?:127\.0\.0\.1|localhost|\[::1\]|0\.0\.0\.0|ipv4:127\.0\.0\.1)):\d{2,5}\b"
            ),
            r"\1:<PORT>",
        ),
        (re.compile(r"\b\d+(?:\.\d+)? ?(?:ms|s|seconds)\b"), "<DURATION>"),
        # A measured duration in JSON (a setting such as 60.0 has one decimal, a measure many).
        (re.compile(r'("[a-z_]*seconds": )-?\d+\.\d{3,}(?:e-?\d+)?'), r"\1<DURATION>"),
    )

    def __call__(self, text: str, *, digests: bool = False) -> str:
        """`text` with the varying parts replaced; `digests` True keeps hex digests as they are."""
        for real in sorted(self.paths, key=len, reverse=True):
            text = text.replace(real, self.paths[real])
        for port in sorted(self.ports, key=lambda p: -len(str(p))):
            text = re.sub(rf"(?<![\d.]){port}(?!\d)", "<PORT>", text)
        for pattern, placeholder in self.PATTERNS:
            if digests and placeholder == "<HEX>":
                continue
            text = pattern.sub(placeholder, text)
        return text


# -- the calls --------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Runs calls and keeps their normalized records, in order."""

    tmp: Path
    normalize: Normalizer
    verbose: bool = False
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(WORKERS))
    pending: list[Future[dict[str, Any]] | dict[str, Any]] = field(default_factory=list)

    def environment(self) -> dict[str, str]:
        """A fixed environment: terminal width, locale, time zone; no experiment config."""
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("FOEDUS_", "PYTEST_"))
        }
        environment.update(
            COLUMNS="100",
            LINES="50",
            LC_ALL="C.UTF-8",
            TZ="UTC",
            PYTHONUNBUFFERED="1",
            PYTHONHASHSEED="0",
            HOME=str(self.tmp / "home"),
        )
        return environment

    def run(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        digests: bool = False,
    ) -> None:
        """Run a console script (or `make`) in the background; its record keeps its place in order."""
        self.pending.append(self.pool.submit(self._run, name, argv, cwd, digests))

    def _run(
        self, name: str, argv: Sequence[str], cwd: Path | None, digests: bool
    ) -> dict[str, Any]:
        """Run one command to its end (or its bound); what it said and its exit code."""
        program = argv[0] if argv[0] == "make" else str(BIN / argv[0])
        started = time.monotonic()
        try:
            done = subprocess.run(
                [program, *argv[1:]],
                cwd=cwd or self.tmp,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=CALL_SECONDS,
                check=False,
            )
            code: int | str = done.returncode
            stdout, stderr = done.stdout, done.stderr
        except subprocess.TimeoutExpired as expired:  # run() killed it; what it said so far
            code = f"killed after {CALL_SECONDS} s"
            stdout, stderr = _text(expired.stdout), _text(expired.stderr)
        if self.verbose:
            print(f"record: {time.monotonic() - started:5.1f} s  {name}", file=sys.stderr)
        return {
            "name": name,
            "argv": [self.normalize(arg) for arg in argv],
            "exit": code,
            "stdout": self.normalize(stdout, digests=digests),
            "stderr": self.normalize(stderr, digests=digests),
        }

    def barrier(self) -> None:
        """Wait for every call started so far (the next calls need what they made)."""
        for item in self.pending:
            if isinstance(item, Future):
                item.result()

    def records(self) -> list[dict[str, Any]]:
        """Every record, in the order the calls were made."""
        self.pool.shutdown(wait=True)
        return [item.result() if isinstance(item, Future) else item for item in self.pending]

    def note(self, name: str, **values: Any) -> None:
        """Record a result that is no command line (a federation, a refusal)."""
        self.pending.append(
            {
                "name": name,
                **{
                    key: self.normalize(value) if isinstance(value, str) else value
                    for key, value in values.items()
                },
            }
        )


def _text(output: bytes | str | None) -> str:
    """What a killed process had written (bytes or text, or nothing)."""
    if isinstance(output, bytes):
        return output.decode("utf-8", errors="replace")
    return output or ""


HELP: tuple[tuple[str, ...], ...] = (
    ("aggregator",),
    ("aggregator", "start"),
    ("aggregator", "status"),
    ("collaborator",),
    ("collaborator", "start"),
    ("pki",),
    ("pki", "ca"),
    ("pki", "request"),
    ("pki", "request", "aggregator"),
    ("pki", "request", "collaborator"),
    ("pki", "request", "user"),
    ("pki", "certify"),
    ("pki", "setup"),
    ("pki", "fingerprint"),
    ("director",),
    ("director", "start"),
    ("director", "dashboard-token"),
    ("envoy",),
    ("envoy", "start"),
    ("envoy", "approve"),
    ("envoy", "reject"),
    ("envoy", "list"),
    ("experiment",),
    *(
        ("experiment", command)
        for command in (
            "submit",
            "list",
            "status",
            "wait",
            "metrics",
            "logs",
            "download",
            "cancel",
            "remove",
            "approve",
            "reject",
            "envoys",
        )
    ),
    ("model",),
    ("model", "inspect"),
    ("model", "export"),
)


def record_help(recorder: Recorder) -> None:
    """Every command's and subcommand's --help, the bare commands, a wrong one, and `make help`."""
    for command in HELP:
        recorder.run(f"help: {' '.join(command)}", [*command, "--help"])
    for name in ("aggregator", "collaborator", "pki", "director", "envoy", "experiment", "model"):
        recorder.run(f"no subcommand: {name}", [name])
    recorder.run("unknown subcommand", ["aggregator", "stop"])
    recorder.run(
        "unknown option",
        ["collaborator", "start", "-n", "alice", "--plan", "p", "--log-level", "loud"],
    )
    recorder.run("make help", ["make", "--no-print-directory", "help"], cwd=REPO)


def plan_variants(plan: Path) -> dict[str, str]:
    """Broken copies of a good plan, by what is wrong with them, as YAML text."""
    document = yaml.safe_load(plan.read_text(encoding="utf-8"))

    def changed(section: str, **values: Any) -> str:
        copy = json.loads(json.dumps(document))
        copy[section] = {**copy[section], **values}
        return yaml.safe_dump(copy)

    good = plan.read_text(encoding="utf-8")
    return {
        "yaml error": good + "\naggregator: [unclosed\n",
        "not a mapping": "- just\n- a list\n",
        "alias": "anchor: &a [1, 2]\n"
        + good.replace("collaborators:", "extra: *a\ncollaborators:", 1),
        "alias bomb": 'a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]\n'
        "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n",
        "unknown key": changed("aggregator", prot=1),
        "wrong type": changed("federation", rounds="ten"),
        "two problems": _two(document),
        "bad straggler policy": changed("straggler", policy="whenever"),
        "bad straggler percentage": changed("straggler", policy="percentage", percentage=1.5),
        "bad straggler timeout": changed("straggler", offline_after_seconds=-3),
        "bad runner setting": changed("runner", settings={"epochs": 0, "split": "iid"}),
        "unknown runner": changed("runner", name="no_such_lab.models:Net"),
        "missing section": yaml.safe_dump({k: v for k, v in document.items() if k != "tasks"}),
    }


def _two(document: Mapping[str, Any]) -> str:
    copy = json.loads(json.dumps(document))
    copy["federation"]["rounds"] = 0
    copy["aggregator"]["prot"] = 1
    return yaml.safe_dump(copy)


def record_plans(recorder: Recorder, plan: Path) -> None:
    """Bad plans, as `aggregator start`, `collaborator start`, `aggregator status` and `pki setup` meet them."""
    folder = recorder.tmp / "bad-plans"
    folder.mkdir()
    missing = folder / "nowhere.yaml"
    recorder.run("plan: missing file, aggregator", ["aggregator", "start", "--plan", str(missing)])
    recorder.run(
        "plan: missing file, collaborator",
        ["collaborator", "start", "-n", "alice", "--plan", str(missing)],
    )
    recorder.run("plan: missing file, status", ["aggregator", "status", "--plan", str(missing)])
    recorder.run("plan: missing file, pki setup", ["pki", "setup", "--plan", str(missing)])
    for what, text in plan_variants(plan).items():
        path = folder / f"{what.replace(' ', '-')}.yaml"
        path.write_text(text, encoding="utf-8")
        recorder.run(f"plan: {what}, aggregator", ["aggregator", "start", "--plan", str(path)])
        recorder.run(
            f"plan: {what}, collaborator",
            ["collaborator", "start", "-n", "alice", "--plan", str(path)],
        )
    recorder.run(
        "plan: name not listed",
        ["collaborator", "start", "-n", "mallory", "--plan", str(plan)],
    )


def record_certificates(recorder: Recorder, plan: Path, certs: CertsLayout) -> None:
    """Missing, unreadable, expired and foreign certificates, as the aggregator and a collaborator meet them."""
    document = yaml.safe_load(plan.read_text(encoding="utf-8"))
    folder = recorder.tmp / "bad-certs"

    def with_certs(name: str, change: Callable[[CertsLayout], None]) -> Path:
        layout = CertsLayout(folder / name / "certs")
        shutil.copytree(certs.root, layout.root)
        change(layout)
        copy = json.loads(json.dumps(document))
        copy["tls"] = {"certs_dir": str(layout.root)}
        path = folder / name / "plan.yaml"
        path.write_text(yaml.safe_dump(copy), encoding="utf-8")
        return path

    signing_key, signing_cert = load_signing_ca(certs)

    def expired(layout: CertsLayout) -> None:
        layout.collaborator_key("alice").unlink()
        layout.collaborator_cert("alice").unlink()
        issue_identity(
            layout.root / "collaborators",
            Role.COLLABORATOR,
            "alice",
            signing_key=signing_key,
            signing_cert=signing_cert,
            days=1,
            valid_from=utc_now() - datetime.timedelta(days=10),
        )

    collaborator = ("collaborator", "start", "-n", "alice", "--plan")
    aggregator = ("aggregator", "start", "--plan")
    cases: dict[str, tuple[Callable[[CertsLayout], None], tuple[tuple[str, ...], ...]]] = {
        "no CA bundle": (lambda layout: layout.ca_bundle.unlink(), (collaborator, aggregator)),
        "no collaborator certificate": (
            lambda layout: layout.collaborator_cert("alice").unlink(),
            (collaborator,),
        ),
        "no collaborator key": (
            lambda layout: layout.collaborator_key("alice").unlink(),
            (collaborator,),
        ),
        "key readable by others": (
            lambda layout: layout.collaborator_key("alice").chmod(0o644),
            (collaborator,),
        ),
        "aggregator key readable by others": (
            lambda layout: layout.aggregator_key.chmod(0o644),
            (aggregator,),
        ),
        "no aggregator certificate": (
            lambda layout: layout.aggregator_cert.unlink(),
            (aggregator,),
        ),
        "certificate is garbage": (
            lambda layout: _overwrite(layout.collaborator_cert("alice"), "not a certificate\n"),
            (collaborator,),
        ),
        "expired certificate": (expired, (collaborator,)),
    }
    for what, (change, commands) in cases.items():
        path = with_certs(what.replace(" ", "-"), change)
        for command in commands:
            recorder.run(f"certificates: {what}, {command[0]}", [*command, str(path)])


def _overwrite(path: Path, text: str) -> None:
    """Replace a file's content."""
    path.write_text(text, encoding="utf-8")


def record_pki(recorder: Recorder, certs: CertsLayout) -> None:
    """`pki`'s own refusals, and a request signed and fingerprinted end to end."""
    folder = recorder.tmp / "pki"
    folder.mkdir()
    ca = str(certs.root)
    recorder.run("pki: ca into a folder that has one", ["pki", "ca", "--dir", ca])
    recorder.run("pki: ca with no --dir", ["pki", "ca"])
    recorder.run(
        "pki: request with a bad name",
        ["pki", "request", "collaborator", "--name", "bad name!", "--dir", str(folder / "bad")],
    )
    recorder.run(
        "pki: request",
        ["pki", "request", "collaborator", "--name", "dave", "--dir", str(folder / "dave")],
    )
    recorder.barrier()
    csrs = sorted((folder / "dave").rglob("*.csr"))
    csr = str(csrs[0] if csrs else folder / "dave" / "dave.csr")
    recorder.run(
        "pki: request again",
        ["pki", "request", "collaborator", "--name", "dave", "--dir", str(folder / "dave")],
    )
    recorder.run("pki: fingerprint", ["pki", "fingerprint", csr])
    recorder.run(
        "pki: fingerprint of a missing file", ["pki", "fingerprint", str(folder / "none.csr")]
    )
    garbage = folder / "garbage.csr"
    garbage.write_text("-----BEGIN CERTIFICATE REQUEST-----\nxx\n", encoding="utf-8")
    recorder.run("pki: fingerprint of garbage", ["pki", "fingerprint", str(garbage)])
    certify = ("pki", "certify", "--role", "collaborator", "--skip-fingerprint-check")
    recorder.run(
        "pki: certify a missing request",
        [*certify, "--dir", ca, "--name", "dave", "--csr", str(folder / "none.csr")],
    )
    recorder.run(
        "pki: certify garbage", [*certify, "--dir", ca, "--name", "dave", "--csr", str(garbage)]
    )
    recorder.run(
        "pki: certify under another name", [*certify, "--dir", ca, "--name", "erin", "--csr", csr]
    )
    recorder.run(
        "pki: certify with no CA",
        [*certify, "--dir", str(folder / "no-ca"), "--name", "dave", "--csr", csr],
    )
    recorder.run(
        "pki: certify with a wrong fingerprint",
        [
            "pki",
            "certify",
            "--role",
            "collaborator",
            "--dir",
            ca,
            "--name",
            "dave",
            "--csr",
            csr,
            "--fingerprint",
            "ab" * 32,
        ],
    )
    recorder.run(
        "pki: certify without the fingerprint check",
        [
            *certify,
            "--dir",
            ca,
            "--name",
            "dave",
            "--csr",
            csr,
            "--out",
            str(folder / "dave-as.crt"),
        ],
    )


def record_director(recorder: Recorder) -> None:
    """The director's bad configurations and the envoy's, as `director` and `envoy` meet them."""
    folder = recorder.tmp / "service"
    certs = make_director_certs(folder / "certs")
    cases: dict[str, dict[str, Any]] = {
        "unknown key": {"reveiw": "manual"},
        "per-user limit above the total": {"max_running_per_user": 5},
        "runner not importable": {"runners": ["digits", "no_such_lab.models:Net"]},
        "malformed runner": {"runners": ["digits", "os.system('rm')"]},
        "wrong type": {"max_running_experiments": "many"},
    }
    for what, changes in cases.items():
        config = write_config(folder / "director" / what.replace(" ", "-"), certs, **changes)
        recorder.run(f"director: {what}", ["director", "start", "--config", str(config)])
    no_certs = write_config(folder / "director" / "no-certs", CertsLayout(folder / "no-certs"))
    recorder.run("director: no certificates", ["director", "start", "--config", str(no_certs)])
    recorder.run(
        "director: missing config", ["director", "start", "--config", str(folder / "none.yaml")]
    )
    recorder.run("director: no --config", ["director", "start"])
    broken = folder / "broken.yaml"
    broken.write_text("listen: [unclosed\n", encoding="utf-8")
    recorder.run("director: YAML error", ["director", "start", "--config", str(broken)])
    good = write_config(folder / "director" / "good", certs)
    recorder.run(
        "director: token for a stranger",
        ["director", "dashboard-token", "--config", str(good), "mallory"],
    )

    envoy_cases: dict[str, dict[str, Any]] = {
        "unknown key": {"colour": "red"},
        "wrong type": {"runners": "digits"},
        "bad shard": {"shard": {"train_samples": -1}},
    }
    for what, keys in envoy_cases.items():
        config = write_envoy_config(folder / "envoy" / what.replace(" ", "-"), certs, 1, **keys)
        recorder.run(f"envoy: {what}", ["envoy", "start", "-n", "alice", "--config", str(config)])
    config = write_envoy_config(folder / "envoy" / "good", certs, 1)
    recorder.run(
        "envoy: name without certificate", ["envoy", "start", "-n", "zed", "--config", str(config)]
    )
    recorder.run(
        "envoy: missing config",
        ["envoy", "start", "-n", "alice", "--config", str(folder / "none.yaml")],
    )
    recorder.run(
        "envoy: approve with no state", ["envoy", "approve", "e1", "--config", str(config)]
    )
    recorder.run("envoy: list with no state", ["envoy", "list", "--config", str(config)])
    recorder.run("envoy: YAML error", ["envoy", "list", "--config", str(broken)])

    client = folder / "client.yaml"
    client.write_text(
        yaml.safe_dump({"director": "localhost:1", "certs_dir": str(certs.root), "name": "ada"}),
        encoding="utf-8",
    )
    recorder.run(
        "experiment: no director listening", ["experiment", "--config", str(client), "list"]
    )
    recorder.run("experiment: no config", ["experiment", "list"])
    bad = folder / "bad-client.yaml"
    bad.write_text("director: localhost\ncerts_dir: c\nname: ada\ncolour: red\n", encoding="utf-8")
    recorder.run("experiment: bad config", ["experiment", "--config", str(bad), "list"])
    recorder.run(
        "experiment: missing config", ["experiment", "--config", str(folder / "none.yaml"), "list"]
    )
    recorder.run(
        "experiment: submit a missing plan",
        ["experiment", "--config", str(client), "submit", str(folder / "none-plan.yaml")],
    )
    recorder.run(
        "experiment: status against no director",
        ["experiment", "--config", str(client), "status", "e1"],
    )


def record_director_calls(recorder: Recorder) -> None:
    """`experiment` as people use it against a live director (in this process, over mutual TLS):
    what they see, the director's refusals among it."""
    from directors import running_director, submitted_plan  # noqa: PLC0415

    folder = recorder.tmp / "live-director"
    certs = make_director_certs(folder / "certs")
    plans = folder / "plans"
    plans.mkdir(parents=True)
    good = plans / "good.yaml"
    good.write_text(yaml.safe_dump(submitted_plan()), encoding="utf-8")
    unknown_key = plans / "unknown-key.yaml"
    unknown_key.write_text(yaml.safe_dump(submitted_plan(aggregator={"prot": 1})), encoding="utf-8")
    owned = plans / "owned-field.yaml"
    owned.write_text(
        yaml.safe_dump(submitted_plan(aggregator={"output_dir": "/etc"})), encoding="utf-8"
    )
    huge = plans / "huge.yaml"
    huge.write_text(
        yaml.safe_dump(submitted_plan(federation={"name": "x" * 20000})), encoding="utf-8"
    )
    with running_director(folder / "director", certs, review="manual") as director:
        recorder.normalize.ports.add(director.port)
        configs = {}
        for name in ("ada", "root", "eve"):
            configs[name] = folder / f"{name}.yaml"
            configs[name].write_text(
                yaml.safe_dump(
                    {
                        "director": f"localhost:{director.port}",
                        "certs_dir": str(certs.root),
                        "name": name,
                    }
                ),
                encoding="utf-8",
            )
        ada, root, eve = (str(configs[name]) for name in ("ada", "root", "eve"))
        unknown = "00000000-0000-4000-8000-000000000000"  # an id of the right form
        calls: list[tuple[str, list[str]]] = [
            ("list, none yet", ["--config", ada, "list"]),
            ("envoys, none registered", ["--config", ada, "envoys"]),
            ("list as an outsider", ["--config", eve, "list"]),
            ("status of a malformed id", ["--config", ada, "status", "e404"]),
            ("status of an unknown experiment", ["--config", ada, "status", unknown]),
            ("metrics of an unknown experiment", ["--config", ada, "metrics", unknown]),
            ("logs of an unknown experiment", ["--config", ada, "logs", unknown]),
            (
                "download of an unknown experiment",
                ["--config", ada, "download", unknown, "--model", "best", "-o", str(folder / "m")],
            ),
            ("cancel an unknown experiment", ["--config", ada, "cancel", unknown]),
            ("remove an unknown experiment", ["--config", ada, "remove", unknown]),
            ("approve as a user", ["--config", ada, "approve", unknown]),
            ("approve an unknown experiment", ["--config", root, "approve", unknown]),
            ("submit a plan with an unknown key", ["--config", ada, "submit", str(unknown_key)]),
            ("submit a plan setting the director's field", ["--config", ada, "submit", str(owned)]),
            ("submit a plan over the size limit", ["--config", ada, "submit", str(huge)]),
            ("submit as an outsider", ["--config", eve, "submit", str(good)]),
        ]
        for what, argv in calls:
            recorder.run(f"experiment, live director: {what}", ["experiment", *argv])
        recorder.barrier()  # every call done before the director stops


def record_model_files(recorder: Recorder) -> None:
    """`model inspect` and `export` on files that are no model."""
    folder = recorder.tmp / "models"
    folder.mkdir()
    garbage = folder / "garbage.pbuf"
    garbage.write_bytes(b"\xff\x00 not a model \x01" * 8)
    empty = folder / "empty.pbuf"
    empty.write_bytes(b"")
    recorder.run("model: inspect a missing file", ["model", "inspect", str(folder / "none.pbuf")])
    recorder.run("model: inspect garbage", ["model", "inspect", str(garbage)])
    recorder.run("model: inspect an empty file", ["model", "inspect", str(empty)])
    recorder.run("model: inspect a folder", ["model", "inspect", str(folder)])
    recorder.run(
        "model: export garbage",
        ["model", "export", "-o", str(folder / "out.safetensors"), str(garbage)],
    )


def record_status(recorder: Recorder, plan: Path) -> None:
    """`aggregator status` on an empty output folder and on a folder of something else."""
    document = yaml.safe_load(plan.read_text(encoding="utf-8"))
    for what in ("empty", "foreign"):
        folder = recorder.tmp / "status" / what
        (folder / "output").mkdir(parents=True)
        if what == "foreign":
            (folder / "output" / "state").mkdir()
            (folder / "output" / "state" / "notes.txt").write_text("hello\n", encoding="utf-8")
            (folder / "output" / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
        copy = json.loads(json.dumps(document))
        copy["aggregator"]["output_dir"] = str(folder / "output")
        path = folder / "plan.yaml"
        path.write_text(yaml.safe_dump(copy), encoding="utf-8")
        recorder.run(f"status: {what} folder", ["aggregator", "status", "--plan", str(path)])
        recorder.run(
            f"status: {what} folder, json", ["aggregator", "status", "--plan", str(path), "--json"]
        )


def record_federation(recorder: Recorder, plan: Path) -> None:
    """A real 2-round federation of alice and bob: what each process printed, then its state and models."""
    recorder.barrier()
    folder = plan.parent
    federation = FederationProcesses(plan, folder)
    try:
        federation.start("aggregator")
        for name in PLAN_COLLABORATORS:
            federation.start(name)
        codes = federation.wait_all(FEDERATION_SECONDS)
    finally:
        federation.stop_all()
    recorder.note(
        "federation: 2 rounds, alice and bob",
        exit=codes,
        aggregator_stdout=federation.output("aggregator"),
        aggregator_stderr=federation.log("aggregator"),
        **{f"{name}_stderr": federation.log(name) for name in PLAN_COLLABORATORS},
    )
    output = folder / "output"
    recorder.run("status: finished federation", ["aggregator", "status", "--plan", str(plan)])
    recorder.run(
        "status: finished federation, json", ["aggregator", "status", "--plan", str(plan), "--json"]
    )
    # The model files of a plan are the same bytes on every run: their digests are kept.
    for what, argv in (
        ("model: inspect the last model", ["model", "inspect", str(output / "last_model.pbuf")]),
        (
            "model: inspect the best model, json",
            ["model", "inspect", "--json", str(output / "best_model.pbuf")],
        ),
    ):
        recorder.run(what, argv, digests=True)
    recorder.run(
        "model: export to npz",
        ["model", "export", "-o", str(folder / "last.npz"), str(output / "last_model.pbuf")],
    )
    recorder.barrier()
    recorder.run(
        "model: export over an existing file",
        ["model", "export", "-o", str(folder / "last.npz"), str(output / "last_model.pbuf")],
    )
    recorder.barrier()  # `status` above must see the aggregator stopped
    recorder.run("start again: finished federation", ["aggregator", "start", "--plan", str(plan)])


# -- refusals over mutual TLS -----------------------------------------------------------------


class Fixtures:
    """Stands in for pytest's `request` in the hostile-input rows: identities by fixture name."""

    def __init__(self, identities: Mapping[str, Identity]) -> None:
        self.identities = dict(identities)

    def getfixturevalue(self, name: str) -> Identity:
        """The identity a row asks for by its fixture's name."""
        return self.identities[name]


REFUSALS = (
    "stranger-of-our-ca",
    "cn-differs-from-sender",
    "wrong-federation",
    "wrong-receiver",
    "heartbeat-with-wrong-sender",
    "unknown-task",
    "wrong-round",
    "stale-round",
    "shape-differs",
    "dtype-differs",
    "bytes-differ-from-shape",
    "train-lacks-a-tensor",
    "download-unknown-tensor",
    "data-size-zero",
    "leave-with-a-reason-over-the-limit",
)


def record_refusals(recorder: Recorder) -> None:
    """A few rows of tests/test_hostile_input.py against a live aggregator: status and message."""
    import test_hostile_input as hostile  # noqa: PLC0415 (only this part needs the servers)

    from foedus.aggregator.federation import Federation  # noqa: PLC0415

    from servers import make_plan, running_aggregator, small_model  # noqa: PLC0415

    certs = CertsLayout(recorder.tmp / "refusals" / "certs")
    setup_local_federation(
        certs,
        aggregator_host=AGGREGATOR_HOST,
        dns_names=AGGREGATOR_DNS,
        ip_addresses=AGGREGATOR_IPS,
        collaborators=COLLABORATORS,
    )
    signing_key, signing_cert = load_signing_ca(certs)
    stranger = issue_identity(
        recorder.tmp / "stranger",
        Role.COLLABORATOR,
        "mallory",
        signing_key=signing_key,
        signing_cert=signing_cert,
    )
    fixtures = Fixtures({"stranger": stranger})
    rows = {row.id: row for row in hostile.ROWS}
    for row_id in REFUSALS:
        row = rows.get(row_id)
        if row is None:
            recorder.note(f"refusal: {row_id}", status="(no such row)", message="")
            continue
        plan = make_plan(certs, **row.sections)
        federation = Federation.from_plan(plan, small_model())
        with running_aggregator(plan, federation) as server:
            env = hostile.Env(plan, federation, server, certs, fixtures)  # type: ignore[arg-type]
            try:
                if row.setup is not None:
                    row.setup(env)
                result = row.attack(env)
                recorder.note(f"refusal: {row_id}", status=result.code.name, message=result.details)
            except Exception as error:
                recorder.note(
                    f"refusal: {row_id}", status=f"({type(error).__name__})", message=str(error)
                )
            finally:
                env.close()


# -- the whole run ----------------------------------------------------------------------------


def record(out: Path, *, verbose: bool = False) -> int:
    """Run every call into a fresh temporary folder and write the records to `out`."""
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="foedus-behaviour-"))
    try:
        normalize = Normalizer()
        normalize.path(tmp, "<TMP>")
        normalize.path(REPO, "<REPO>")
        recorder = Recorder(tmp, normalize, verbose)
        (tmp / "home").mkdir()
        record_help(recorder)

        federation_folder = tmp / "federation"
        certs = CertsLayout(federation_folder / "certs")
        plan = write_plan(
            federation_folder,
            certs,
            rounds=2,
            collaborators=list(PLAN_COLLABORATORS),  # type: ignore[arg-type]
        )
        normalize.ports.add(yaml.safe_load(plan.read_text(encoding="utf-8"))["aggregator"]["port"])
        recorder.run("pki: setup from the plan", ["pki", "setup", "--plan", str(plan)])
        recorder.barrier()
        recorder.run("pki: setup again (idempotent)", ["pki", "setup", "--plan", str(plan)])
        recorder.barrier()

        record_plans(recorder, plan)
        record_certificates(recorder, plan, certs)
        record_status(recorder, plan)
        record_pki(recorder, certs)
        record_model_files(recorder)
        record_director(recorder)
        record_director_calls(recorder)
        record_federation(recorder, plan)
        record_refusals(recorder)
        records = recorder.records()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.write_text(
        json.dumps({"records": records}, indent=1, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    print(
        f"record: {len(records)} records in {out} ({time.monotonic() - started:.0f} s)",
        file=sys.stderr,
    )
    return 0


# -- comparing --------------------------------------------------------------------------------


def compare(before: Path, after: Path) -> int:
    """Print every record that differs between two recordings; 1 if any does, else 0."""
    old = {r["name"]: r for r in json.loads(before.read_text(encoding="utf-8"))["records"]}
    new = {r["name"]: r for r in json.loads(after.read_text(encoding="utf-8"))["records"]}
    differences = 0
    for name in [*old, *(n for n in new if n not in old)]:
        if name not in new:
            print(f"--- {name}: only in {before}")
            differences += 1
            continue
        if name not in old:
            print(f"+++ {name}: only in {after}")
            differences += 1
            continue
        for key in [*old[name], *(k for k in new[name] if k not in old[name])]:
            a, b = old[name].get(key), new[name].get(key)
            if a == b:
                continue
            differences += 1
            print(f"=== {name}: {key}")
            if isinstance(a, str) and isinstance(b, str):
                sys.stdout.writelines(
                    difflib.unified_diff(
                        a.splitlines(keepends=True),
                        b.splitlines(keepends=True),
                        str(before),
                        str(after),
                        n=1,
                    )
                )
                print()
            else:
                print(f"  {before}: {a!r}\n  {after}: {b!r}")
    print(f"compare: {differences} difference(s) in {len(old)} / {len(new)} records")
    return 1 if differences else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`record.py OUT.json`, or `record.py --compare A B`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", nargs="?", type=Path, help="where to write the recording (JSON)")
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar=("A", "B"), help="print how B differs from A"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print each call's time")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("give OUT.json, or --compare A B")
    return record(args.out, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
