"""The ``corral`` command as users type it: every bad flag value is one line and exit code 1.

Each row runs the real installed ``corral`` script; nothing starts, because the value is refused
before the port is bound (or, for a taken port, instead of binding it).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from corral.web.version import VERSION

CORRAL = str(Path(sys.executable).with_name("corral"))

BAD_FLAGS = [
    ("--port", "99999"), ("--port", "-1"), ("--port", "http"), ("--port", ""),
    ("--log-level", "loud"), ("--loop", "trio"), ("--limit-mechanism", "magic"),
    ("--host", ""), ("--agent", "no_colon"), ("--agent", "pkg.mod:"), ("--agent", "a b:C"),
    ("--data-dir", ""), ("--run-dir", ""), ("--database-url", ""), ("--tenants", ""),
    ("--max-sessions", "0"), ("--max-sessions", "1.5"), ("--max-sessions", "lots"),
    ("--max-sessions-per-tenant", "-1"), ("--max-restarts", "-1"), ("--mailbox-size", "0"),
    ("--rate-burst", "0"), ("--rate-limit", "-1"), ("--rate-limit", "fast"),
    ("--idle-timeout", "0"), ("--idle-timeout", "soon"), ("--idle-timeout", "nan"),
    ("--max-age", "-5"), ("--max-age", "inf"), ("--restart-window", "0"), ("--stop-timeout", "-1"),
    ("--spawn-timeout", "0"), ("--request-timeout", "0"), ("--retention", "-1"),
    ("--memory-limit", "lots"), ("--memory-limit", "-1"), ("--max-message-bytes", "0"),
    ("--max-message-bytes", "1X"), ("--admin-token", ""), ("--admin-token", "two words"),
    ("--metrics-token", ""), ("--cors-origins", "app.example"), ("--cors-origins", "ftp://x"),
    ("--bogus", "1"),
]


def corral(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    """Run the installed ``corral`` command."""
    return subprocess.run([CORRAL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line(result: subprocess.CompletedProcess, mentions: str) -> None:
    """Exit 1, nothing on stdout, and one short line on stderr naming the problem."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and len(lines[0]) < 300 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("corral") and mentions in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("flag,value", BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_every_bad_flag_value_is_one_line_and_exit_1(tmp_path, flag, value):
    result = corral("serve", f"{flag}={value}", "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"))
    assert_one_line(result, flag if flag != "--bogus" else "unrecognized arguments")


@pytest.mark.parametrize("name,value", [("CORRAL_PORT", "99999"), ("CORRAL_LOG_LEVEL", "loud"), ("CORRAL_IDLE_TIMEOUT", "0")])
def test_bad_environment_values_are_one_line_too(tmp_path, name, value):
    result = corral("serve", "--data-dir", str(tmp_path / "data"), env={name: value})
    assert_one_line(result, name)


def test_a_taken_port_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = corral("serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"))
    assert_one_line(result, f"cannot listen on 127.0.0.1:{port}: address already in use")
    assert not (tmp_path / "data").exists()  # refused before anything touched the store


@pytest.mark.parametrize("args,says", [
    (["serve", "--prot", "8095"], "corral serve: unrecognized arguments: --prot 8095; did you mean --port? (see corral serve --help)"),
    (["serve", "--idle-timout=5"], "corral serve: unrecognized arguments: --idle-timout=5; did you mean --idle-timeout?"),
    (["sessions", "logs", "x", "--lnes", "3"], "corral sessions logs: unrecognized arguments: --lnes 3; did you mean --lines?"),
    (["serve", "extra"], "corral serve: unrecognized arguments: extra (see corral serve --help)"),
])
def test_an_unknown_argument_is_told_by_its_subcommand_with_the_nearest_flag(args, says):
    assert_one_line(corral(*args), says)


def test_no_command_is_one_line():
    assert_one_line(corral(), "required")


def test_version():
    result = corral("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"corral {VERSION}"


@pytest.mark.parametrize("command", [[], ["serve"], ["top"], ["sessions"], ["sessions", "list"], ["sessions", "kill"]])
def test_help_is_plain_text(command):
    result = corral(*command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: corral")
    assert "``" not in result.stdout
