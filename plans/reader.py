"""The strict YAML reader: safe text without aliases, then each mapping read key by key.

Every YAML file and text foedus reads (plans, director.yaml, envoy.yaml, experiment configs, site
settings, plans sent over the network) is parsed by `safe_yaml` (or `parse_yaml`, which says where
the text is wrong), which refuses aliases before expanding them. A `Section` reads one mapping: each
getter checks its key and default, a problem is one line naming the key's path (`aggregator.port:
expected an integer 0-65535, got '80a'`), and `finish` reports every key nobody asked for, so a typo
never falls back to a default. Problems are collected, never raised one by one: the caller reports
them all at once, naming its file (`foedus.plans.loader.PlanError`, the services' `ConfigError`s).
Values are quoted bounded and cut (`shown`, `cut`), or not at all within `values_hidden`.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import re
import reprlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import yaml

from foedus.plans.schema import Address

T = TypeVar("T")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RUNNER_PATTERN = re.compile(
    r"^([A-Za-z_][A-Za-z0-9_]*)(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?$"
)
_MISSING: Any = object()


class Section:
    """One mapping of a YAML file (a plan, director.yaml...), read key by key; problems go to a shared list."""

    def __init__(self, data: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self.problems.append(f"{path or 'plan'}: expected a mapping, got {_kind(data)}")
            data = {}
        self.data: Mapping[Any, Any] = data

    def key(self, key: str) -> str:
        """The path of `key` in this section, as problems name it (`aggregator.port`)."""
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: object) -> object:
        self.seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            self.problems.append(f"{self.key(key)}: required, but missing")
        return default

    def checked(self, key: str, default: T, check: Callable[[object], T | None], want: str) -> T:
        """The checked value at `key`; `default` (already reported if required) when absent or bad."""
        value = self._get(key, default)
        if key not in self.data:
            return default
        result = check(value)
        if result is None:
            self.problems.append(f"{self.key(key)}: expected {want}, got {shown(value)}")
            return default
        return result

    def section(self, key: str) -> Section:
        """The nested mapping under `key` (empty when absent)."""
        return Section(self._get(key, None), self.key(key), self.problems)

    def text(
        self, key: str, default: str = _MISSING, *, pattern: re.Pattern[str] | None = None
    ) -> str:
        """A non-empty string, matching `pattern` if given."""

        def check(value: object) -> str | None:
            if not isinstance(value, str) or not value.strip():
                return None
            return value if pattern is None or pattern.match(value) else None

        want = f"a name matching {pattern.pattern}" if pattern else "a non-empty string"
        return self.checked(key, default, check, want)

    def integer(self, key: str, default: int = _MISSING, *, low: int, high: int) -> int:
        """An integer in [low, high] (YAML booleans are not integers)."""

        def check(value: object) -> int | None:
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
            return value if ok else None  # type: ignore[return-value]

        return self.checked(key, default, check, f"an integer {low}-{high}")

    def optional_integer(self, key: str, default: int | None, *, low: int, high: int) -> int | None:
        """An integer in [low, high], or null for "no bound"."""
        if self.data.get(key, 0) is None:
            self.seen.add(key)
            return None
        return self.integer(key, default, low=low, high=high)  # type: ignore[arg-type]

    def number(self, key: str, default: float = _MISSING, *, low: float, high: float) -> float:
        """A number in [low, high]."""

        def check(value: object) -> float | None:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return float(value) if ok and low <= value <= high else None  # type: ignore[operator, arg-type]

        return self.checked(key, default, check, f"a number {low:g}-{high:g}")

    def optional_number(
        self, key: str, default: float | None, *, low: float, high: float
    ) -> float | None:
        """A number in [low, high], or null for "no bound"."""
        if self.data.get(key, 0) is None:
            self.seen.add(key)
            return None
        return self.number(key, default, low=low, high=high)  # type: ignore[arg-type]

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of `choices`."""
        return self.checked(
            key, default, lambda v: v if v in choices else None, f"one of {', '.join(choices)}"
        )

    def flag(self, key: str, default: bool = _MISSING) -> bool:
        """A boolean."""
        return self.checked(
            key, default, lambda v: v if isinstance(v, bool) else None, "true or false"
        )

    def names(
        self, key: str, default: tuple[str, ...] = _MISSING, *, unique: bool = True
    ) -> tuple[str, ...]:
        """A list of names (letters, digits, '.', '_', '-'), without duplicates if `unique`."""

        def check(value: object) -> tuple[str, ...] | None:
            if not isinstance(value, list):
                return None
            if not all(isinstance(item, str) and NAME_PATTERN.match(item) for item in value):
                return None
            return tuple(value)

        result = self.checked(
            key, default, check, f"a list of names matching {NAME_PATTERN.pattern}"
        )
        if unique and isinstance(result, tuple) and len(set(result)) != len(result):
            duplicates = sorted({name for name in result if result.count(name) > 1})
            self.problems.append(
                f"{self.key(key)}: listed more than once: {shown_text(', '.join(duplicates), 200)}"
            )
        return result

    def runner_names(
        self, key: str, default: tuple[str, ...] = _MISSING, *, empty: bool = False
    ) -> tuple[str, ...]:
        """A list of runner names a host agrees to import (built-in or package.module:Class)."""

        def check(value: object) -> tuple[str, ...] | None:
            if not isinstance(value, list) or not (value or empty):
                return None
            if not all(isinstance(item, str) and RUNNER_PATTERN.match(item) for item in value):
                return None
            return tuple(value)

        kind = "a list" if empty else "a non-empty list"
        return self.checked(
            key, default, check, f"{kind} of runner names (built-in or package.module:Class)"
        )

    def finish(self) -> None:
        """Report keys this reader never asked for: they are typos or unsupported settings."""
        for key in self.data:
            if key not in self.seen:
                self.problems.append(f"{self.key(cut(str(key)))}: unknown key")


# A host name as DNS allows it (letters, digits, '-', dots between labels).
HOST_PATTERN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
LOOPBACK = "127.0.0.1"


def read_listen_address(section: Section, key: str) -> Address | None:
    """`host:port`, `[v6]:port`, or a port alone (on loopback); None when absent or null."""
    if section.data.get(key) is None:
        section.seen.add(key)
        return None

    def check(value: object) -> Address | None:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return None
        host, colon, port = value.rpartition(":")
        if not colon:
            host, port = LOOPBACK, value
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if not _is_ip(host, version=6):
                return None
        elif not _is_ip(host, version=4) and not _is_host_name(host):
            return None
        if not (port.isascii() and port.isdigit() and 0 <= int(port) <= 65535):
            return None
        return Address(host, int(port))

    return section.checked(
        key,
        None,
        check,
        "host:port, [IPv6]:port, or a port alone (on 127.0.0.1), with a port 0-65535",
    )


def _is_host_name(text: str) -> bool:
    """A DNS name, not a mistyped address: its last label is not all digits."""
    return bool(HOST_PATTERN.match(text)) and not text.rsplit(".", 1)[-1].isdigit()


def _is_ip(text: str, *, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


ALIASES_REFUSED = "YAML aliases (*name) are not accepted: write the value out"


class _NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` refusing every alias (`*name`, `<<: *name`) before composing it.

    An alias makes a small text a huge value (a "billion laughs"), flat in memory until a
    message, a dump or a check walks it. Plans and configs have no need of them, so they are
    refused outright (not counted): nothing is expanded, and the rule is one line to explain.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Any node but an alias, composed as `SafeLoader` does."""
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                ALIASES_REFUSED,
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]
            )
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """`yaml.safe_load` refusing aliases; raises what `parse_yaml` turns into `YamlTextError`."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader: no Python objects built


class YamlTextError(ValueError):
    """Text that is not a YAML document: `problem` as a message may quote it, `line` if known."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        self.problem = problem
        self.line = line  # 1-based
        super().__init__(problem)


def parse_yaml(text: str) -> object:
    """The YAML document in `text` (with `safe_yaml`); `YamlTextError` saying where, if not YAML."""
    try:
        return safe_yaml(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or error
        line = where.line + 1 if where is not None else None
        raise YamlTextError(_yaml_problem(str(problem)), line) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise YamlTextError("nested too deeply") from None
    except ValueError as error:  # a scalar PyYAML cannot build: 2020-13-45, !!int x, 5000 digits
        raise YamlTextError(shown_text(str(error), 120)) from None


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


# Bounded, so a value built from YAML aliases (a "billion laughs") is not printed whole.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


# Set while a plan is read from a file a request named (the site API's plan_path): its problems
# then name keys and what is wrong, never a value, so no request reads a file through errors.
_HIDE_VALUES: contextvars.ContextVar[bool] = contextvars.ContextVar("hide_values", default=False)
HIDDEN = "(a value of the file, not shown)"


@contextlib.contextmanager
def values_hidden() -> Iterator[None]:
    """Within it, problems quote no value of the plan (`shown` says `HIDDEN` instead)."""
    token = _HIDE_VALUES.set(True)
    try:
        yield
    finally:
        _HIDE_VALUES.reset(token)


def shown(value: object) -> str:
    """A value of the file as a problem quotes it: bounded, cut, or hidden."""
    return HIDDEN if _HIDE_VALUES.get() else cut(_REPR.repr(value))


def shown_text(text: str, limit: int = 60) -> str:
    """A message quoting the plan's values (a path, a library's error), cut, or hidden."""
    return HIDDEN if _HIDE_VALUES.get() else cut(text, limit)


def _yaml_problem(problem: str) -> str:
    """PyYAML's problem, cut; hidden, without what it quotes of the text ('...')."""
    if _HIDE_VALUES.get():
        return cut(re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", problem), 120)
    return cut(problem, 120)


def cut(text: str, limit: int = 60) -> str:
    """`text`, cut to `limit` characters: a message quotes a value, never all of a big one."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
