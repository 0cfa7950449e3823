"""Operator commands over the admin API of a running server: ``corral top`` and ``corral sessions``.

They talk HTTP (urllib, no extra dependency) to ``--url`` with ``--admin-token`` sent as a Bearer
token; both default from ``CORRAL_URL`` and ``CORRAL_ADMIN_TOKEN``. ``corral top`` draws a live
rich table refreshed every second (keys: ``m`` memory, ``c`` CPU, ``i`` idle, ``n`` messages,
``q`` quit); ``--once`` prints one plain, whitespace-separated snapshot for scripts.
``corral sessions logs ID`` prints the last lines a session's agent wrote to stdout and stderr.
``corral usage [--tenant NAME] [--since ...] [--until ...]`` prints each tenant's usage over a period.
"""

import argparse
import contextlib
import json
import os
import select
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080"
PAGE = 1000  # the admin API's largest page

# sort key name -> (row field, descending)
SORTS = {
    "mem": ("rss_bytes", True),
    "cpu": ("cpu_percent", True),
    "idle": ("idle_seconds", True),
    "messages": ("message_count", True),
    "pid": ("pid", False),
}
_SORT_KEYS = {"m": "mem", "c": "cpu", "i": "idle", "n": "messages", "p": "pid"}
COLUMNS = ("SESSION", "PID", "TENANT", "STATE", "IDLE", "RSS", "USS", "CPU%", "CORES", "PROCS", "FILES", "MSGS", "NODE")
TEXT_COLUMNS = ("SESSION", "TENANT", "STATE", "NODE")
# Limits whose mechanism enforces nothing: shown as no limit (the start-up log says why).
UNENFORCED = ("none", "unavailable")


class OpsError(Exception):
    """A failure to report to the operator in one line (no traceback)."""


class AdminClient:
    """A small client of the admin API."""

    def __init__(self, url: str, token: str | None, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, query: dict | None = None):
        """One JSON request; an OpsError saying what went wrong if it fails."""
        target = self.url + path
        if query:
            target += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        req = urllib.request.Request(target, method=method, headers={"Accept": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise OpsError(f"{method} {path}: {exc.code} {_error_message(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise OpsError(f"cannot reach {self.url}: {reason}") from None
        except ValueError:
            raise OpsError(f"{method} {path}: the server did not answer JSON") from None

    def sessions(self, *, state: str | None = None, tenant: str | None = None, most: int = 10_000) -> list[dict]:
        """Admin rows, following pages up to ``most``."""
        rows, offset = [], 0
        while offset is not None and len(rows) < most:
            page = self.request("GET", "/admin/sessions",
                                {"state": state, "tenant": tenant, "limit": min(PAGE, most - len(rows)), "offset": offset})
            rows += page.get("sessions", [])
            offset = page.get("next_offset")
        return rows

    def kill(self, session_id: str, purge: bool = False, tenant: str | None = None) -> dict:
        """Kill (or forget) one session (``tenant``: whose, when several tenants use the id)."""
        quoted = urllib.parse.quote(session_id, safe="")
        return self.request("DELETE", f"/admin/sessions/{quoted}", {"purge": "true" if purge else None, "tenant": tenant})

    def logs(self, session_id: str, lines: int | None = None, tenant: str | None = None) -> dict:
        """The kept lines of one session's agent output."""
        quoted = urllib.parse.quote(session_id, safe="")
        return self.request("GET", f"/admin/sessions/{quoted}/logs", {"lines": lines, "tenant": tenant})


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The ``error.message`` of a JSON error body, else the reason phrase."""
    try:
        return json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


# ------------------------------------------------------------------------------------ formatting

def human_bytes(n) -> str:
    """1536 -> '1.5K'; None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"  # unreachable: G is the last unit


def human_seconds(s) -> str:
    """75 -> '1m15s'; None -> '-'."""
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def limit_of(row: dict, name: str):
    """A session's enforced limit ``name`` (pids, cpu, open_files) from its ``limits``, else None."""
    limit = (row.get("limits") or {}).get(name) or {}
    return None if limit.get("mechanism") in UNENFORCED else limit.get("limit")


def used_of(used, most) -> str:
    """'3/64' (in use / the limit); '3' without a limit, '-/64' when the use is unknown."""
    used = "-" if used is None else str(used)
    return used if most is None else f"{used}/{most}"


def cells(row: dict) -> list[str]:
    """One row's cells in COLUMNS order."""
    cpu, cores = row.get("cpu_percent"), limit_of(row, "cpu")
    return [
        str(row.get("session_id")),
        str(row.get("pid") or "-"),
        str(row.get("tenant")),
        str(row.get("state")),
        human_seconds(row.get("idle_seconds")),
        human_bytes(row.get("rss_bytes")),
        human_bytes(row.get("uss_bytes")),
        "-" if cpu is None else f"{cpu:.1f}",
        "-" if cores is None else f"{cores:g}",
        used_of(row.get("processes"), limit_of(row, "pids")),
        used_of(row.get("open_fds"), limit_of(row, "open_files")),
        str(row.get("message_count", 0)),
        str(row.get("node") or "-"),  # in a cluster, the node that owns the session
    ]


def sort_rows(rows: list[dict], sort: str) -> list[dict]:
    """Rows sorted by a SORTS key (missing values last)."""
    field, descending = SORTS[sort]
    present = [r for r in rows if r.get(field) is not None]
    missing = [r for r in rows if r.get(field) is None]
    return sorted(present, key=lambda r: r[field], reverse=descending) + missing


def plain_table(rows: list[dict]) -> str:
    """Whitespace-separated columns with a header line, numbers aligned right (like ``ps``): what ``--once`` prints."""
    names = list(COLUMNS)  # every column, always: scripts read them by position
    table = [names] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(names))]

    def fit(cell: str, name: str, width: int) -> str:
        return cell.ljust(width) if name in TEXT_COLUMNS else cell.rjust(width)

    return "\n".join(" ".join(fit(c, n, w) for c, n, w in zip(line, names, widths)).rstrip() for line in table)


def rich_table(rows: list[dict], url: str, sort: str):
    """The live view's table: fits 80 columns, as the text columns give way first (ellipsis), never a number."""
    from rich.table import Table

    total_rss = sum(r.get("rss_bytes") or 0 for r in rows)
    nodes = {r.get("node") for r in rows}
    # one node (a lone server, or a cluster using one): the title names it and the column goes
    names = [n for n in COLUMNS if n != "NODE" or len(nodes) > 1]
    on = f" ({nodes.pop() or '-'})" if len(nodes) == 1 else ""
    title = f"corral top — {url}{on} — {len(rows)} live, {human_bytes(total_rss)} RSS — sort: {sort}"
    table = Table(title=title, caption="m mem · c cpu · i idle · n messages · p pid · q quit", expand=True,
                  box=None, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for name in names:
        if name in TEXT_COLUMNS:
            table.add_column(name, justify="left", overflow="ellipsis")
        else:
            table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        by_name = dict(zip(COLUMNS, cells(row)))
        table.add_row(*(by_name[n] for n in names))
    return table


# ------------------------------------------------------------------------------------ commands

def top(client: AdminClient, *, sort: str, once: bool, interval: float, out=sys.stdout) -> int:
    """``corral top``: a snapshot, or a live table until q or Ctrl-C."""
    if once:
        print(plain_table(sort_rows(client.sessions(state="live"), sort)), file=out)
        return 0
    from rich.live import Live

    with _keys() as read_key, Live(auto_refresh=False, screen=False) as live:
        while True:
            rows = sort_rows(client.sessions(state="live"), sort)
            live.update(rich_table(rows, client.url, sort), refresh=True)
            key = read_key(interval)
            if key == "q":
                return 0
            sort = _SORT_KEYS.get(key, sort)


@contextlib.contextmanager
def _keys():
    """A function that waits up to N seconds for one key press (None without a terminal)."""
    if not sys.stdin.isatty():
        yield lambda timeout: time.sleep(timeout)
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read_key(timeout: float):
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace").lower() if ready else None

    try:
        yield read_key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def sessions_list(client: AdminClient, *, state: str | None, tenant: str | None, as_json: bool, out=sys.stdout) -> int:
    """``corral sessions list``."""
    rows = client.sessions(state=state, tenant=tenant)
    if as_json:
        print(json.dumps(rows, indent=1), file=out)
    else:
        print(plain_table(rows), file=out)
    return 0


def sessions_kill(client: AdminClient, session_id: str, *, purge: bool, tenant: str | None = None,
                  out=sys.stdout) -> int:
    """``corral sessions kill ID``."""
    row = client.kill(session_id, purge=purge, tenant=tenant)
    print(f"{row.get('session_id', session_id)} {row.get('state')}{' purged' if row.get('purged') else ''}", file=out)
    return 0


def sessions_logs(client: AdminClient, session_id: str, *, lines: int | None, as_json: bool,
                  tenant: str | None = None, out=sys.stdout) -> int:
    """``corral sessions logs ID``: one line per output line, ``TIME PID STREAM text``."""
    answer = client.logs(session_id, lines, tenant)
    if as_json:
        print(json.dumps(answer, indent=1), file=out)
        return 0
    for entry in answer.get("lines", []):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry.get("time", 0)))
        print(f"{stamp}Z {entry.get('pid')} {entry.get('stream')} {entry.get('line')}", file=out)
    if not answer.get("lines"):
        # on stderr: a script reading stdout still gets no line, a person learns why there is none
        print(f"corral: session {session_id} has no output kept (its agent printed nothing on this server"
              + (", or --lines 0 was asked" if lines == 0 else "") + ")", file=sys.stderr)
    return 0


# (header, usage field, how it is shown) of ``corral usage``'s table
USAGE_COLUMNS = (
    ("TENANT", None, str), ("STARTS", "starts", str), ("TURNS", "turns", str), ("IN", "messages_in", str),
    ("OUT", "messages_out", str), ("BYTES_IN", "bytes_in", human_bytes), ("BYTES_OUT", "bytes_out", human_bytes),
    ("CPU_S", "cpu_seconds", lambda v: f"{v:.1f}"), ("MIB_S", "memory_mib_seconds", lambda v: f"{v:.0f}"),
    ("PEAK", "memory_peak_bytes", human_bytes), ("EGRESS", "egress_bytes", human_bytes), ("ENDS", "ends", str),
)


def usage_table(tenants: dict) -> str:
    """``corral usage``'s table: a row per tenant, then the reasons of its ends."""
    table = [[name for name, _, _ in USAGE_COLUMNS]]
    for tenant, used in sorted(tenants.items()):
        table.append([tenant if field is None else show(used.get(field, 0)) for _, field, show in USAGE_COLUMNS])
    widths = [max(len(line[i]) for line in table) for i in range(len(USAGE_COLUMNS))]
    lines = [" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in table]
    for tenant, used in sorted(tenants.items()):
        reasons = ", ".join(f"{reason} {n}" for reason, n in (used.get("end_reasons") or {}).items())
        if reasons:
            lines.append(f"{tenant} ends: {reasons}")
    return "\n".join(lines)


def usage(client: AdminClient, *, tenant: str | None, since: str | None, until: str | None, as_json: bool,
          out=sys.stdout) -> int:
    """``corral usage``."""
    answer = client.request("GET", "/admin/usage", {"tenant": tenant, "since": since, "until": until})
    print(json.dumps(answer, indent=1) if as_json else usage_table(answer.get("tenants", {})), file=out)
    return 0


# ------------------------------------------------------------------------------------ parser

def add_parsers(sub) -> None:
    """Add ``top``, ``sessions`` and ``usage`` to the ``corral`` subcommands."""
    top_p = sub.add_parser("top", help="live table of sessions of a running server")
    _connection_flags(top_p)
    top_p.add_argument("--sort", choices=sorted(SORTS), default="mem", help="sort by (default mem)")
    top_p.add_argument("--once", action="store_true", help="print one plain snapshot and exit")
    top_p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    sessions = sub.add_parser("sessions", help="list, kill or read the agent output of sessions of a running server")
    actions = sessions.add_subparsers(dest="action", required=True)
    list_p = actions.add_parser("list", help="list sessions (live and stored)")
    _connection_flags(list_p)
    list_p.add_argument("--state", help="only this state, or 'live'")
    list_p.add_argument("--tenant", help="only this tenant")
    list_p.add_argument("--json", action="store_true", help="print the admin API's rows as JSON")
    kill_p = actions.add_parser("kill", help="kill a session")
    _connection_flags(kill_p)
    kill_p.add_argument("session_id")
    kill_p.add_argument("--purge", action="store_true", help="also delete its messages and record")
    kill_p.add_argument("--tenant", help="whose session (ids are per tenant; needed when several use the id)")
    logs_p = actions.add_parser("logs", help="the last lines a session's agent wrote to stdout and stderr")
    _connection_flags(logs_p)
    logs_p.add_argument("session_id")
    logs_p.add_argument("--lines", type=int, help="only the last N lines (default: all the server keeps)")
    logs_p.add_argument("--json", action="store_true", help="print the admin API's answer as JSON")
    logs_p.add_argument("--tenant", help="whose session (ids are per tenant; needed when several use the id)")

    usage_p = sub.add_parser("usage", help="usage per tenant over a period (turns, CPU, memory, ends, ...)")
    _connection_flags(usage_p)
    usage_p.add_argument("--tenant", help="only this tenant")
    usage_p.add_argument("--since", help="unix seconds, ISO 8601 or an age such as 24h or 7d (default: all)")
    usage_p.add_argument("--until", help="the same (default: now)")
    usage_p.add_argument("--json", action="store_true", help="print the admin API's answer as JSON")


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    """--url and --admin-token, defaulting from the environment."""
    parser.add_argument("--url", default=os.environ.get("CORRAL_URL", DEFAULT_URL),
                        help=f"server address (default {DEFAULT_URL}) [env CORRAL_URL]")
    parser.add_argument("--admin-token", default=os.environ.get("CORRAL_ADMIN_TOKEN"),
                        help="admin token [env CORRAL_ADMIN_TOKEN]")


def run(args: argparse.Namespace) -> int:
    """Run ``top`` or ``sessions``; errors print one line and return 1."""
    client = AdminClient(args.url, args.admin_token)
    try:
        if args.command == "top":
            return top(client, sort=args.sort, once=args.once, interval=args.interval)
        if args.command == "usage":
            return usage(client, tenant=args.tenant, since=args.since, until=args.until, as_json=args.json)
        if args.action == "list":
            return sessions_list(client, state=args.state, tenant=args.tenant, as_json=args.json)
        if args.action == "logs":
            return sessions_logs(client, args.session_id, lines=args.lines, as_json=args.json, tenant=args.tenant)
        return sessions_kill(client, args.session_id, purge=args.purge, tenant=args.tenant)
    except OpsError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
