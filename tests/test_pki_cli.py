"""Tests of the pki command line, in-process through main(argv), plus one subprocess smoke test."""

from __future__ import annotations

import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from foedus.pki.binding import binding_name
from foedus.pki.cli import main
from foedus.pki.files import read_certificate, read_csr
from foedus.pki.layout import CertsLayout
from foedus.pki.requests import Role, fingerprint
from foedus.pki.roles import ROLE_OIDS

from federation_processes import run_module

REPO = Path(__file__).resolve().parent.parent
TERMINAL_SECONDS = 60


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error_line(err: str, *expected: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pki: error: ")
    for text in expected:
        assert text in lines[0]


def _fingerprint_in(out: str) -> str:
    line = next(line for line in out.splitlines() if line.startswith("SHA-256 fingerprint"))
    return line.rsplit(" ", 1)[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> CertsLayout:
    """A fresh folder with a CA made by `pki ca`."""
    assert _run(capsys, "ca", "--dir", str(tmp_path / "fed"), "--days", "30")[0] == 0
    return CertsLayout(tmp_path / "fed")


def test_ca_makes_the_ca_and_refuses_to_replace_it(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pki ca` writes both CAs, 0600 keys and the bundle; a second run needs --force."""
    for path in (ca_dir.root_ca_cert, ca_dir.signing_ca_cert, ca_dir.ca_bundle):
        assert path.is_file()
    assert _mode(ca_dir.root_ca_key) == _mode(ca_dir.signing_ca_key) == 0o600
    old_root = ca_dir.root_ca_cert.read_bytes()
    code, out, err = _run(capsys, "ca", "--dir", str(ca_dir.root))
    assert code == 2 and out == ""
    _assert_one_error_line(err, str(ca_dir.root_ca_key), "--force")
    assert _run(capsys, "ca", "--dir", str(ca_dir.root), "--force")[0] == 0
    assert ca_dir.root_ca_cert.read_bytes() != old_root


def test_request_and_certify_collaborator(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A collaborator requests, the signer certifies with the printed fingerprint, and both print the same one."""
    code, out, err = _run(
        capsys, "request", "collaborator", "--name", "alice", "--dir", str(ca_dir.root)
    )
    assert (code, err) == (0, "")
    printed = _fingerprint_in(out)
    assert printed == fingerprint(read_csr(ca_dir.collaborator_csr("alice")))
    assert _mode(ca_dir.collaborator_key("alice")) == 0o600

    code, out, err = _run(
        capsys,
        "certify",
        "--dir",
        str(ca_dir.root),
        "--role",
        "collaborator",
        "--name",
        "alice",
        "--fingerprint",
        printed.upper(),
    )
    assert (code, err) == (0, "")
    assert _fingerprint_in(out) == printed
    cert = read_certificate(ca_dir.collaborator_cert("alice"))
    assert cert.public_key() == read_csr(ca_dir.collaborator_csr("alice")).public_key()


def test_request_and_certify_aggregator_to_out(
    ca_dir: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The aggregator's request carries --dns and --ip; certify --out writes where it is told."""
    code, _, err = _run(
        capsys,
        "request",
        "aggregator",
        "--host",
        "agg.example.org",
        "--dns",
        "agg",
        "--ip",
        "10.0.0.5",
        "--dir",
        str(ca_dir.root),
    )
    assert (code, err) == (0, "")
    out_path = tmp_path / "elsewhere" / "server.crt"
    code, out, err = _run(
        capsys,
        "certify",
        "--dir",
        str(ca_dir.root),
        "--role",
        "aggregator",
        "--name",
        "agg.example.org",
        "--out",
        str(out_path),
        "--skip-fingerprint-check",
    )
    assert (code, err) == (0, "")
    assert str(out_path) in out
    sans = read_certificate(out_path).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(v.value) for v in sans.value] == [
        "agg.example.org",
        "agg",
        "10.0.0.5",
        binding_name("agg.example.org"),
    ]
    assert not ca_dir.aggregator_cert.exists()


def test_certify_refuses_a_wrong_fingerprint(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """--fingerprint that does not match the request exits 2 naming the request; no certificate is written."""
    _run(capsys, "request", "collaborator", "--name", "bob", "--dir", str(ca_dir.root))
    code, out, err = _run(
        capsys,
        "certify",
        *("--dir", str(ca_dir.root), "--role", "collaborator", "--name", "bob"),
        *("--fingerprint", "ab" * 32),
    )
    assert (code, out) == (2, "")
    _assert_one_error_line(err, str(ca_dir.collaborator_csr("bob")), "does not match")
    assert not ca_dir.collaborator_cert("bob").exists()


def test_certify_refuses_a_request_for_another_name(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """Certifying bob with alice's request exits 2 naming the request file."""
    _run(capsys, "request", "collaborator", "--name", "alice", "--dir", str(ca_dir.root))
    csr = str(ca_dir.collaborator_csr("alice"))
    code, _, err = _run(
        capsys,
        "certify",
        *("--dir", str(ca_dir.root), "--role", "collaborator", "--name", "bob", "--csr", csr),
    )
    assert code == 2
    _assert_one_error_line(err, csr, "'alice' does not match")


def _certify_argv(layout: CertsLayout, name: str, *extra: str) -> list[str]:
    return ["certify", "--dir", str(layout.root), "--role", "collaborator", "--name", name, *extra]


def test_certify_without_fingerprint_and_terminal_refuses_with_the_remedy(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --fingerprint and without a terminal to ask on, certify exits 2 saying what to pass."""
    _run(capsys, "request", "collaborator", "--name", "dave", "--dir", str(ca_dir.root))
    printed = fingerprint(read_csr(ca_dir.collaborator_csr("dave")))
    code, out, err = _run(capsys, *_certify_argv(ca_dir, "dave"))
    assert (code, out) == (2, "")
    _assert_one_error_line(
        err, "not signed", printed, "no terminal", "--fingerprint HEX", "--skip-fingerprint-check"
    )
    assert not ca_dir.collaborator_cert("dave").exists()


def test_skip_fingerprint_check_signs_and_says_so(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """--skip-fingerprint-check signs without a terminal and says loudly that nothing was compared."""
    _run(capsys, "request", "collaborator", "--name", "dave", "--dir", str(ca_dir.root))
    code, out, err = _run(capsys, *_certify_argv(ca_dir, "dave", "--skip-fingerprint-check"))
    assert (code, err) == (0, "")
    assert "NOT CHECKED against the requester's fingerprint" in out
    assert ca_dir.collaborator_cert("dave").is_file()


def _certify_on_a_terminal(argv: list[str], answer: bytes) -> tuple[int, str, str]:
    """Run `python -m foedus.pki` with a pseudo-terminal as stdin and stderr, answering its question.

    Returns the exit code, stdout, and what the terminal showed (the question and the answer's echo).
    """
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "foedus.pki", *argv],
        cwd=REPO,
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + TERMINAL_SECONDS
    try:
        answered = False
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no end on the terminal: {shown!r}"
            ready, _, _ = select.select([controller], [], [], min(remaining, 1.0))
            if not ready:
                if process.poll() is not None and answered:
                    break
                continue
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the process closed its side of the terminal
                break
            if not chunk:
                break
            shown += chunk
            if not answered and b"[y/N]" in shown:
                os.write(controller, answer)
                answered = True
        out, _ = process.communicate(timeout=TERMINAL_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        os.close(controller)
    assert answered, shown
    return process.returncode, out.decode(), shown.decode(errors="replace")


@pytest.mark.parametrize(("answer", "signed"), [(b"y\n", True), (b"\n", False), (b"no\n", False)])
def test_certify_on_a_terminal_shows_the_fingerprint_and_asks(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str], answer: bytes, signed: bool
) -> None:
    """On a terminal, certify shows the request's fingerprint and signs only on yes (default no)."""
    _run(capsys, "request", "collaborator", "--name", "erin", "--dir", str(ca_dir.root))
    printed = fingerprint(read_csr(ca_dir.collaborator_csr("erin")))
    code, out, shown = _certify_on_a_terminal(_certify_argv(ca_dir, "erin"), answer)
    assert f"SHA-256 fingerprint of the request: {printed}" in shown
    assert "Traceback" not in shown
    if signed:
        assert code == 0, shown
        assert "You confirmed it matches" in out
        assert ca_dir.collaborator_cert("erin").is_file()
    else:
        assert (code, out) == (1, ""), shown
        assert "pki: error: not signed: the request's fingerprint was not confirmed" in shown
        assert not ca_dir.collaborator_cert("erin").exists()


def test_setup_signs_its_own_requests_without_asking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pki setup` makes and signs its own requests: no terminal, no --fingerprint, exit 0."""
    plan = _plan(tmp_path, "{certs_dir: certs}")
    code, _, err = _run(capsys, "setup", "--plan", str(plan))
    assert (code, err) == (0, "")
    assert CertsLayout(tmp_path / "certs").collaborator_cert("alice").is_file()


def test_request_refuses_to_replace_a_key(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second request for the same collaborator needs --force, and then makes a new key."""
    argv = ("request", "collaborator", "--name", "carol", "--dir", str(ca_dir.root))
    assert _run(capsys, *argv)[0] == 0
    key = ca_dir.collaborator_key("carol")
    old = key.read_bytes()
    code, _, err = _run(capsys, *argv)
    assert code == 2
    _assert_one_error_line(err, str(key), "--force")
    assert key.read_bytes() == old
    assert _run(capsys, *argv, "--force")[0] == 0
    assert key.read_bytes() != old and _mode(key) == 0o600


def test_fingerprint_of_request_and_certificate(
    certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pki fingerprint` prints the SHA-256 of a CSR or a certificate and nothing else."""
    for path, obj in (
        (certs.aggregator_csr, read_csr(certs.aggregator_csr)),
        (certs.aggregator_cert, read_certificate(certs.aggregator_cert)),
    ):
        code, out, err = _run(capsys, "fingerprint", str(path))
        assert (code, out, err) == (0, fingerprint(obj) + "\n", "")


def _plan(tmp_path: Path, tls: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        "federation: {name: t, uuid: t-1, rounds: 1}\n"
        "aggregator: {host: localhost, port: 0, san_dns: [localhost], san_ips: [127.0.0.1]}\n"
        f"tls: {tls}\n"
        "collaborators: [alice, bob]\n"
        "tasks: [train]\n"
        "runner: {name: digits}\n"
    )
    return path


def test_setup_from_a_plan_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pki setup --plan` makes the plan's federation, and a second run keeps everything."""
    plan = _plan(tmp_path, "{certs_dir: certs}")
    code, out, err = _run(capsys, "setup", "--plan", str(plan), "--days", "10")
    assert (code, err) == (0, "")
    assert "created: CA, aggregator localhost, collaborator alice, collaborator bob" in out
    layout = CertsLayout(tmp_path / "certs")
    assert _mode(layout.collaborator_key("bob")) == 0o600
    code, out, err = _run(capsys, "setup", "--plan", str(plan))
    assert (code, err) == (0, "")
    assert "created" not in out
    assert "kept: CA, aggregator localhost, collaborator alice, collaborator bob" in out


def test_request_and_certify_a_user(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A person's certificate: users/NAME.crt, clientAuth and the user role mark, its SAN exactly
    DNS:NAME."""
    code, out, err = _run(capsys, "request", "user", "--name", "ada", "--dir", str(ca_dir.root))
    assert (code, err) == (0, "")
    assert _mode(ca_dir.user_key("ada")) == 0o600
    code, _out, err = _run(
        capsys,
        "certify",
        "--dir",
        str(ca_dir.root),
        "--role",
        "user",
        "--name",
        "ada",
        "--fingerprint",
        _fingerprint_in(out),
    )
    assert (code, err) == (0, "")
    cert = read_certificate(ca_dir.user_cert("ada"))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, ROLE_OIDS[Role.USER]]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName("ada")]


def test_a_user_request_is_not_certified_as_another_role(
    ca_dir: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """Certifying a user's request under a collaborator's files finds no request: exit 2."""
    assert _run(capsys, "request", "user", "--name", "ada", "--dir", str(ca_dir.root))[0] == 0
    code, _out, err = _run(
        capsys, "certify", "--dir", str(ca_dir.root), "--role", "collaborator", "--name", "ada"
    )
    assert code == 2
    _assert_one_error_line(err, str(ca_dir.collaborator_csr("ada")))


def test_setup_from_a_director_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pki setup --director` certifies the host, every envoy, and users and admins once each."""
    config = tmp_path / "director.yaml"
    config.write_text(
        "host: localhost\ncerts_dir: certs\nstate_dir: state\nenvoys: [alice, bob]\n"
        "users: [ada, root]\nadmins: [root]\n",
        encoding="utf-8",
    )
    code, out, err = _run(capsys, "setup", "--director", str(config))
    assert (code, err) == (0, "")
    assert (
        "created: CA, aggregator localhost, collaborator alice, collaborator bob, user ada, "
        "user root"
    ) in out
    layout = CertsLayout(tmp_path / "certs")
    assert layout.user_cert("root").is_file() and layout.collaborator_cert("bob").is_file()
    code, out, err = _run(capsys, "setup", "--director", str(config))
    assert (code, "created" in out) == (0, False)


def test_setup_from_a_bad_director_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A director.yaml with a typo: exit 2, one line naming the file and the key."""
    config = tmp_path / "director.yaml"
    config.write_text("host: localhost\ncerts_dir: c\nstate_dir: s\nenvoy: [a]\n", "utf-8")
    code, _out, err = _run(capsys, "setup", "--director", str(config))
    assert code == 2
    _assert_one_error_line(err, f"{config}: envoy: unknown key", "envoys: required")


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["ca"],
        ["request"],
        ["request", "aggregator"],
        ["request", "collaborator"],
        ["request", "user"],
        ["certify"],
        ["setup"],
        ["fingerprint"],
    ],
)
def test_help_exits_zero(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--help of pki and of every subcommand prints usage and exits 0."""
    with pytest.raises(SystemExit) as caught:
        main([*command, "--help"])
    assert caught.value.code == 0
    assert "usage: pki" in capsys.readouterr().out


def _bad_input(case: str, tmp: Path) -> tuple[list[str], list[str]]:
    """argv for one bad-input case, and the texts its error line must contain."""
    missing = str(tmp / "missing.csr")
    if case == "fingerprint of a missing file":
        return ["fingerprint", missing], [missing, "not found"]
    if case == "fingerprint of garbage":
        (tmp / "garbage.crt").write_text("hello\n")
        return ["fingerprint", str(tmp / "garbage.crt")], [str(tmp / "garbage.crt"), "not a PEM"]
    if case == "certify without a request":
        csr = str(tmp / "collaborators" / "alice.csr")
        return [
            *("certify", "--dir", str(tmp), "--role", "collaborator", "--name", "alice"),
        ], [csr, "not found"]
    if case == "certify a missing --csr":
        return [
            *("certify", "--dir", str(tmp), "--role", "collaborator", "--name", "a"),
            *("--csr", missing),
        ], [missing, "not found"]
    if case == "request a bad name":
        return ["request", "collaborator", "--name", "a/b", "--dir", str(tmp)], ["'a/b'"]
    if case == "request a bad IP":
        return [
            *("request", "aggregator", "--host", "h", "--ip", "1.2.3", "--dir", str(tmp)),
        ], ["'1.2.3'"]
    if case == "setup a missing plan":
        return ["setup", "--plan", missing], [missing, "not found"]
    if case == "setup an insecure plan":
        plan = _plan(tmp, "{insecure: true}")
        return ["setup", "--plan", str(plan)], [str(plan), "insecure"]
    if case == "setup a plan with typos":
        plan = _plan(tmp, "{certs_dir: c}")
        plan.write_text(plan.read_text() + "colaborators: [x]\nrounds: 2\n")
        return ["setup", "--plan", str(plan)], [
            str(plan),
            "colaborators: unknown key",
            "rounds: unknown key",
        ]
    if case == "zero days":
        return ["ca", "--dir", str(tmp), "--days", "0"], ["--days", "'0'", "pki ca --help"]
    if case == "missing arguments":
        return ["certify", "--role", "collaborator"], ["--dir", "--name"]
    assert case == "unknown command"
    return ["frobnicate"], ["frobnicate"]


@pytest.mark.parametrize(
    "case",
    [
        "fingerprint of a missing file",
        "fingerprint of garbage",
        "certify without a request",
        "certify a missing --csr",
        "request a bad name",
        "request a bad IP",
        "setup a missing plan",
        "setup an insecure plan",
        "setup a plan with typos",
        "zero days",
        "missing arguments",
        "unknown command",
    ],
)
def test_bad_input_exits_2_with_one_error_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad input exits 2 with a single 'pki: error:' line naming the file or argument at fault."""
    argv, expected = _bad_input(case, tmp_path)
    code, out, err = _run(capsys, *argv)
    assert (code, out) == (2, "")
    _assert_one_error_line(err, *expected)


def test_unexpected_failure_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that is not bad input exits 1 with one error line and no traceback."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("foedus.pki.cli.write_ca", broken)
    code, _, err = _run(capsys, "ca", "--dir", str(tmp_path))
    assert code == 1
    _assert_one_error_line(err, "unexpected failure: RuntimeError: disk on fire")


def test_python_m_pki_help() -> None:
    """`python -m foedus.pki --help` runs as a program and exits 0."""
    done = run_module("pki", "--help", timeout=30)
    assert done.returncode == 0, done.stderr
    assert "usage: pki" in done.stdout
    for command in ("ca", "request", "certify", "setup", "fingerprint"):
        assert command in done.stdout
