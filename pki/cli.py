"""The ``pki`` command: make a CA, request and sign participant certificates, set up a local federation."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from foedus.command.arguments import Commands, command, program
from foedus.command.exits import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from foedus.command.output import quiet_when_stdout_closes, stdout_closed
from foedus.command.usage import Parser, UsageError, fail, unexpected
from foedus.pki.binding import canonical_common_name
from foedus.pki.errors import PemFileError, PkiError
from foedus.pki.files import parse_certificates, parse_csr, read_pem_file
from foedus.pki.layout import CertsLayout
from foedus.pki.local import (
    DEFAULT_CA_DAYS,
    DEFAULT_LEAF_DAYS,
    SetupResult,
    certify_file,
    request_files,
    setup_local_federation,
    write_ca,
)
from foedus.pki.requests import Role, fingerprint

SKIP_FINGERPRINT_CHECK = "--skip-fingerprint-check"


class _NotConfirmedError(Exception):
    """The person at the terminal did not confirm the request's fingerprint; nothing is signed."""


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of days >= 1, got {text!r}")
    return value


def _cmd_ca(args: argparse.Namespace) -> int:
    layout = CertsLayout(args.dir)
    write_ca(layout, days=args.days, force=args.force)
    print(f"root CA:    {layout.root_ca_cert}")
    print(f"signing CA: {layout.signing_ca_cert}")
    print(f"CA bundle:  {layout.ca_bundle}  (give this file to every participant)")
    return EXIT_OK


def _cmd_request(args: argparse.Namespace) -> int:
    role = Role(args.role)
    if role is Role.AGGREGATOR:
        name, dns, ips = args.host, args.dns, args.ip
    else:
        name, dns, ips = args.name, [], []
    paths, csr = request_files(
        CertsLayout(args.dir), role, name, dns_names=dns, ip_addresses=ips, force=args.force
    )
    print(f"private key: {paths.key}  (mode 0600; never send it anywhere)")
    print(f"request:     {paths.csr}  (send this to the federation's signer)")
    print(f"SHA-256 fingerprint of the request: {fingerprint(csr)}")
    print("Tell the signer this fingerprint by another channel (phone, chat) so they can check it.")
    return EXIT_OK


def _cmd_certify(args: argparse.Namespace) -> int:
    out, _cert, csr_fingerprint = certify_file(
        CertsLayout(args.dir),
        Role(args.role),
        args.name,
        days=args.days,
        csr_path=args.csr,
        out=args.out,
        expected_fingerprint=args.fingerprint,
        confirm=_fingerprint_check(args),
    )
    print(f"certificate: {out}")
    print(f"SHA-256 fingerprint of the request: {csr_fingerprint}")
    if args.fingerprint is not None:
        print("It matches the fingerprint given with --fingerprint.")
    elif args.skip_fingerprint_check:
        print(
            f"NOT CHECKED against the requester's fingerprint ({SKIP_FINGERPRINT_CHECK}): compare "
            "it now, and do not hand out the certificate if it differs."
        )
    else:
        print("You confirmed it matches the fingerprint the requester reported.")
    return EXIT_OK


def _fingerprint_check(args: argparse.Namespace) -> Callable[[str], None] | None:
    """How `certify` binds the request to its requester when no --fingerprint is given.

    The fingerprint told out of band is the only thing that shows a request came from the person
    it names, so without it a person must compare it on a terminal, or say loudly they will not.
    """
    if args.fingerprint is not None or args.skip_fingerprint_check:
        return None
    if not sys.stdin.isatty():

        def refuse(csr_fingerprint: str) -> None:
            raise UsageError(
                f"not signed: the request's SHA-256 fingerprint is {csr_fingerprint} and there is "
                f"no terminal to ask whether it is the one the requester reported; pass "
                f"--fingerprint HEX (as the requester reported it), run on a terminal to compare "
                f"it, or pass {SKIP_FINGERPRINT_CHECK} to sign it unchecked"
            )

        return refuse
    return _ask_on_terminal


def _ask_on_terminal(csr_fingerprint: str) -> None:
    """Show the fingerprint and ask; anything but yes (the default) refuses."""
    print(f"SHA-256 fingerprint of the request: {csr_fingerprint}", file=sys.stderr)
    print(
        "Is it the fingerprint the requester told you by another channel (phone, in person)? "
        "Sign the request? [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    answer = sys.stdin.readline()
    if answer.strip().lower() not in ("y", "yes"):
        raise _NotConfirmedError("not signed: the request's fingerprint was not confirmed")


def _cmd_setup(args: argparse.Namespace) -> int:
    if args.director is not None:
        return _setup_director(args)
    # Imported here: plans imports pki.layout, so a module-level import would be a cycle.
    from foedus.plans import PlanError, load_plan  # noqa: PLC0415

    try:
        plan = load_plan(args.plan)
    except PlanError as exc:
        raise UsageError("; ".join(str(exc).splitlines())) from None
    layout = plan.tls.certs
    if layout is None:
        raise UsageError(f"{args.plan}: plan is insecure (tls.insecure: true); nothing to set up")
    aggregator = plan.aggregator
    dns_names, ip_addresses = list(aggregator.san_dns), list(aggregator.san_ips)
    # The certificate names the common name collaborators expect; the host they dial is a SAN.
    if canonical_common_name(aggregator.host) != canonical_common_name(aggregator.common_name):
        try:
            ip_addresses.append(str(ipaddress.ip_address(aggregator.host)))
        except ValueError:
            dns_names.append(aggregator.host)
    result = setup_local_federation(
        layout,
        aggregator_host=aggregator.common_name,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        collaborators=plan.collaborators,
        days=args.days,
        force=args.force,
    )
    _print_setup(layout, result)
    return EXIT_OK


def _setup_director(args: argparse.Namespace) -> int:
    """Every certificate a local director needs: its host's, its envoys' (their collaborators
    use the same), and its users' and admins'."""
    # Imported here, as plans is above: director.yaml's reader imports pki.layout.
    from foedus.plans.director_config import ConfigError, load_config  # noqa: PLC0415

    try:
        config = load_config(args.director)
    except ConfigError as exc:
        raise UsageError("; ".join(exc.problems)) from None
    result = setup_local_federation(
        config.certs,
        aggregator_host=config.host,
        dns_names=(),
        ip_addresses=(),
        collaborators=config.envoys,
        users=tuple(dict.fromkeys((*config.users, *config.admins))),
        days=args.days,
        force=args.force,
    )
    _print_setup(config.certs, result)
    return EXIT_OK


def _print_setup(layout: CertsLayout, result: SetupResult) -> None:
    print(f"certificates in {layout.root}")
    for label, items in (
        ("created", result.created),
        ("renewed", result.renewed),
        ("kept", result.kept),
    ):
        if items:
            print(f"  {label}: {', '.join(items)}")


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    path: Path = args.file
    data = read_pem_file(path, "certificate or certificate signing request")
    if b"-----BEGIN CERTIFICATE REQUEST-----" in data:
        print(fingerprint(parse_csr(data, path)))
    elif b"-----BEGIN CERTIFICATE-----" in data:
        print(fingerprint(parse_certificates(data, path)[0]))
    else:
        raise PemFileError(f"{path}: not a PEM certificate or certificate signing request")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main so its help can be tested and documented."""
    parser, commands = program(
        "pki",
        "Certificates for a foedus federation: a CA, participants' keys and requests, "
        "and the signed certificates they use for mutual TLS.",
    )

    def handled(
        subparsers: Commands,
        name: str,
        summary: str,
        handler: Callable[[argparse.Namespace], int],
    ) -> Parser:
        sub = command(subparsers, name, summary)
        sub.set_defaults(handler=handler)
        return sub

    ca = handled(
        commands, "ca", "Make the federation's root CA, signing CA and CA bundle in DIR.", _cmd_ca
    )
    ca.add_argument("--dir", type=Path, required=True, help="the federation's certificate folder")
    ca.add_argument(
        "--days", type=_days, default=DEFAULT_CA_DAYS, help=f"validity (default {DEFAULT_CA_DAYS})"
    )
    ca.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (every participant then needs a new certificate)",
    )

    request = command(
        commands,
        "request",
        "Make a participant's private key and certificate signing request.",
        description="Make a participant's private key (mode 0600) and certificate signing request, "
        "and print the request's fingerprint to tell the signer.",
    )
    roles = request.add_subparsers(dest="role", required=True, metavar="ROLE")
    aggregator = handled(
        roles, "aggregator", "Key and request for the aggregator (TLS server).", _cmd_request
    )
    aggregator.add_argument(
        "--host", required=True, help="host name collaborators dial (the certificate's CN)"
    )
    aggregator.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name for the certificate (repeatable)",
    )
    aggregator.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="an IP address for the certificate (repeatable)",
    )
    collaborator = handled(
        roles, "collaborator", "Key and request for a collaborator (TLS client).", _cmd_request
    )
    collaborator.add_argument(
        "--name", required=True, help="the collaborator's name, as in the plan"
    )
    user = handled(
        roles, "user", "Key and request for a person using a director (TLS client).", _cmd_request
    )
    user.add_argument(
        "--name", required=True, help="the person's name, as in director.yaml's users or admins"
    )
    for sub in (aggregator, collaborator, user):
        sub.add_argument(
            "--dir", type=Path, required=True, help="the certificate folder to write into"
        )
        sub.add_argument("--force", action="store_true", help="replace an existing private key")

    certify = handled(
        commands,
        "certify",
        "Sign a participant's request with the signing CA in DIR, after checking it.",
        _cmd_certify,
    )
    certify.add_argument(
        "--dir", type=Path, required=True, help="the federation's certificate folder (with the CA)"
    )
    certify.add_argument(
        "--role",
        required=True,
        choices=[role.value for role in Role],
        help="what the certificate is for; written into it as its role mark, which the director "
        "and the aggregator compare with the role they give its name",
    )
    certify.add_argument(
        "--name",
        required=True,
        help="the host (aggregator), collaborator or user name being certified",
    )
    certify.add_argument(
        "--csr", type=Path, help="the request file (default: the participant's in DIR)"
    )
    certify.add_argument(
        "--out",
        type=Path,
        help="where to write the certificate (default: the participant's in DIR)",
    )
    certify.add_argument(
        "--days",
        type=_days,
        default=DEFAULT_LEAF_DAYS,
        help=f"validity (default {DEFAULT_LEAF_DAYS})",
    )
    certify.add_argument(
        "--fingerprint",
        metavar="HEX",
        help="the request's SHA-256 fingerprint as the requester reported it; refuse on mismatch "
        "(without it, certify shows the fingerprint and asks on a terminal, default no, and "
        "refuses when there is no terminal)",
    )
    certify.add_argument(
        SKIP_FINGERPRINT_CHECK,
        action="store_true",
        help="sign WITHOUT comparing the request's fingerprint with the requester's: anyone who "
        "could put a request in place of theirs gets a certificate in their name",
    )

    setup = handled(
        commands,
        "setup",
        "Make a whole local federation's CA and certificates from a plan or a director.yaml "
        "(idempotent).",
        _cmd_setup,
    )
    source = setup.add_mutually_exclusive_group(required=True)
    source.add_argument("--plan", type=Path, help="the federation plan (YAML)")
    source.add_argument(
        "--director",
        type=Path,
        metavar="CONFIG",
        help="a director.yaml: its host's certificate, its envoys' and its users' and admins'",
    )
    setup.add_argument(
        "--days",
        type=_days,
        default=DEFAULT_LEAF_DAYS,
        help=f"participant validity (default {DEFAULT_LEAF_DAYS})",
    )
    setup.add_argument(
        "--force", action="store_true", help="make everything new: CA, keys and certificates"
    )

    show = handled(
        commands,
        "fingerprint",
        "Print the SHA-256 fingerprint of a request or certificate.",
        _cmd_fingerprint,
    )
    show.add_argument(
        "file", type=Path, metavar="FILE", help="a PEM certificate signing request or certificate"
    )
    return parser


def _fail(message: str, code: int) -> int:
    return fail("pki", message, code)


@quiet_when_stdout_closes
def main(argv: Sequence[str] | None = None) -> int:
    """Run the pki command line; returns the exit code (0 ok, 2 bad input, 1 not confirmed or failed)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except (UsageError, PkiError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except _NotConfirmedError as exc:
        print(file=sys.stderr)  # end the prompt's line
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_FAILURE)
    except BrokenPipeError:
        return stdout_closed()
    except Exception as exc:
        return _fail(unexpected(exc), EXIT_FAILURE)
