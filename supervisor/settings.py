"""How a setting is declared: its kind (how its text is read), its checks, its help and its default.

Each ``Config`` field (supervisor/config.py) is declared with ``setting(...)``, as gunicorn's
``Setting`` does: ``corral serve``'s flags, the ``CORRAL_*`` environment, the defaults shown in
``--help`` and the table in docs/configuration.md are all derived from those declarations
(``python -m corral.supervisor.settings`` prints the table).
"""

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from corral.agent_proc.environment import parse_entry
from corral.supervisor.limit_plan import parse_cores, parse_size

Check = Callable[[object], str | None]  # a value -> the problem with it, or None


class SettingError(ValueError):
    """A setting's value is out of its range; ``name`` says which setting, ``problem`` what is wrong."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


# Checks of a value (a Config built in code meets them as much as one built from flags).

def finite(value) -> str | None:
    """Refuse inf and nan."""
    return None if math.isfinite(value) else "must be a finite number"


def positive(value) -> str | None:
    """Refuse zero and below."""
    return None if value > 0 else "must be positive"


def at_least_one(value) -> str | None:
    """Refuse zero and below (a count)."""
    return None if value >= 1 else "must be at least 1"


def non_negative(value) -> str | None:
    """Refuse below zero."""
    return None if value >= 0 else "cannot be negative"


def one_of(*allowed: str) -> Check:
    """Refuse a value outside a fixed set, naming the set."""
    return lambda value: None if value in allowed else f"must be one of {', '.join(allowed)}"


def between(low, high, problem: str) -> Check:
    """Refuse a value outside [low, high] with ``problem``."""
    return lambda value: None if low <= value <= high else problem


# Parsers of a flag's or variable's text: a ValueError says what was expected.

def whole(text: str) -> int:
    """A whole number."""
    if not text.strip().lstrip("-").isdigit():
        raise ValueError("expected a whole number")
    return int(text)


def seconds(text: str) -> float:
    """A finite number (of seconds, or a rate)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(value):
        raise ValueError("expected a finite number of seconds")
    return value


def port_number(text: str) -> int:
    """A TCP port, 0 meaning any free one."""
    port = whole(text)
    if not 0 <= port <= 65535:
        raise ValueError("a port is 0-65535")
    return port


def nonempty(text: str) -> str:
    """A non-empty string."""
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def token(text: str) -> str:
    """A bearer token: non-empty, no whitespace (it travels in an Authorization header)."""
    if not text or any(ch.isspace() for ch in text):
        raise ValueError("a token is a non-empty string without spaces")
    return text


def agent_spec(text: str) -> str:
    """An agent class spec, pkg.module:Class (imported later, by the zygote)."""
    module, _, cls = text.partition(":")
    if not module or not cls.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError("expected pkg.module:Class")
    return text


def origins(text: str) -> tuple[str, ...]:
    """Comma-separated origins (scheme://host[:port]) or *."""
    found = tuple(o.strip() for o in text.split(",") if o.strip())
    for origin in found:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/")):
            raise ValueError(f"an origin looks like https://app.example[:port] or is *, not {origin!r}")
    return found


def env_entry(text: str) -> str:
    """An environment variable for agents: ``NAME`` (the server's value) or ``NAME=VALUE``."""
    parse_entry(text)
    return text


def env_entries(value) -> str | None:
    """Refuse a tuple of entries with one that is not ``NAME`` or ``NAME=VALUE``."""
    for entry in value:
        try:
            parse_entry(entry)
        except ValueError as exc:
            return f"{exc} (got {entry.partition('=')[0]!r})"
    return None

def http_url(text: str) -> str:
    """One http(s) URL."""
    url = text.strip()
    scheme, sep, rest = url.partition("://")
    if scheme not in ("http", "https") or not sep or not rest.split("/")[0]:
        raise ValueError(f"expected http://host[:port]/path or https://..., not {url!r}")
    return url


def path(text: str) -> Path:
    """A filesystem path."""
    return Path(nonempty(text))


def pick(*allowed: str) -> Callable[[str], str]:
    """A parser of one of a fixed set of words."""

    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    return parse


@dataclass(frozen=True)
class Kind:
    """What a setting's text means: its name in messages, its parser and the checks every value meets."""

    name: str
    parse: Callable[[str], object]
    checks: tuple[Check, ...] = ()
    show: Callable[[object], str] = str  # how --help and the docs print a default
    repeat: str | None = None  # repeatable: the flag may be given again; the variable splits on this (" ": any whitespace)

    def parse_all(self, text: str):
        """The value of a flag or variable's text: one value, or a tuple of them split on ``repeat``."""
        if self.repeat is None:
            return self.parse(text)
        parts = text.split() if self.repeat == " " else text.split(self.repeat)
        return tuple(self.parse(part.strip()) for part in parts if part.strip())


def _show_number(value: float) -> str:
    """1800.0 as 1800, 0.5 as 0.5."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _show_size(value: int) -> str:
    """536870912 as 512M."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value and value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


SECONDS = Kind("seconds", seconds, (finite,), _show_number)
RATE = Kind("rate", seconds, (finite,), _show_number)
COUNT = Kind("count", whole)
SIZE = Kind("size", parse_size, (), _show_size)
TEXT = Kind("text", nonempty)
URL = Kind("url", nonempty)
PATH = Kind("path", path)
TOKEN = Kind("token", token)
PORT = Kind("port", port_number, (between(0, 65535, "must be 0-65535"),))
AGENT = Kind("agent", agent_spec)
CORES = Kind("cores", parse_cores, (), _show_number)
ORIGINS = Kind("origins", origins, (), lambda value: ",".join(value))
ENV_ENTRY = Kind("NAME[=VALUE]", env_entry, (env_entries,), lambda value: " ".join(value) or "none", " ")


def repeated(name: str, parse: Callable[[str], object], separator: str) -> Kind:
    """A kind whose flag may be repeated (the value is a tuple); its variable lists values split on ``separator``."""
    return Kind(name, parse, (), lambda value: ", ".join(map(str, value)) or "none", separator)


def choice(name: str, allowed: tuple[str, ...]) -> Kind:
    """A kind whose values are one of ``allowed``."""
    return Kind(name, pick(*allowed), (one_of(*allowed),))


@dataclass(frozen=True)
class Setting:
    """One setting's declaration (the metadata of its Config field)."""

    kind: Kind
    help: str  # plain text: --help prints it
    checks: tuple[Check, ...] = ()
    default_text: str | None = None  # the default as people read it, when printing it would mislead
    doc: str | None = None  # the docs' longer Markdown meaning, when the help is not enough


def setting(default=MISSING, kind: Kind = TEXT, help: str = "", *checks: Check, factory=MISSING,
            default_text: str | None = None, doc: str | None = None):
    """A Config field carrying its Setting."""
    meta = {"setting": Setting(kind, help, checks, default_text, doc)}
    return field(default=default, default_factory=factory, metadata=meta)


@dataclass(frozen=True)
class Declared:
    """A setting as the command line, the environment and the docs see it."""

    name: str
    setting: Setting
    default: object

    @property
    def flag(self) -> str:
        """``--idle-timeout``."""
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """``CORRAL_IDLE_TIMEOUT``."""
        return env_name(self.name)

    @property
    def shown_default(self) -> str:
        """The default as --help and the docs print it."""
        if self.setting.default_text is not None:
            return self.setting.default_text
        return "none" if self.default is None else self.setting.kind.show(self.default)

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` for this setting, or None (None itself means unset: fine)."""
        if value is None:
            return None
        for check in (*self.setting.kind.checks, *self.setting.checks):
            found = check(value)
            if found:
                return found
        return None


def env_name(name: str) -> str:
    """The environment variable for a setting."""
    return "CORRAL_" + name.upper()


def declared(config_class) -> list[Declared]:
    """Every setting of a Config dataclass, in declaration order."""
    out = []
    for f in fields(config_class):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        out.append(Declared(f.name, f.metadata["setting"], default))
    return out


def check_all(config) -> None:
    """Raise SettingError for the first setting whose value fails its checks."""
    for item in declared(type(config)):
        problem = item.problem(getattr(config, item.name))
        if problem:
            raise SettingError(item.name, problem)


def markdown_table(config_class) -> str:
    """The settings table of docs/configuration.md."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for item in declared(config_class):
        meaning = (item.setting.doc or item.setting.help).replace("|", "\\|")  # a bare | would split the cell
        rows.append(f"| `{item.flag}` | `{item.env}` | `{item.shown_default}` | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    from corral.supervisor.config import Config

    print(markdown_table(Config), end="")
