"""Nothing of the server's is an agent's unless declared (issue 19, items 1 and 7).

A real ``corral serve`` holds an admin token, a tenant key, a database password and an upstream key
in its environment, on its command line and in files; a hostile agent searches everything of its
own (environment, /proc/self, argv, gc, its stack, its raw memory) and finds none of them, while
the variables the operator declared reach it.
"""

import asyncio
import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest

from tests.agents.hostile import SECRET_MARK
from tests.cluster_kit import POSTGRES_URL, create_database, drop_database
from tests.procs import CORRAL_MAIN, descendants, start_server
from tests.test_sandbox import shared_dir, unprivileged_uid  # noqa: F401  fixtures
from tests.test_userns import python_for_user  # noqa: F401  fixture
from tests.unprivileged_kit import serve_as_user

REPO = Path(__file__).resolve().parent.parent


def secret() -> str:
    """A secret the hunter recognises (tests/agents/hostile.py)."""
    return SECRET_MARK + secrets.token_hex(8)


def call(url: str, path: str, body=None, *, token: str | None = None, method: str | None = None):
    """(status, decoded JSON or text) of one request."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def database_url_with_password(tmp_path: Path, password: str) -> tuple[str, str | None]:
    """A database URL holding ``password`` (PostgreSQL's test server trusts any), and the database to drop."""
    if not POSTGRES_URL:
        return f"sqlite:///{tmp_path}/{password}.sqlite3", None
    name, url = asyncio.run(create_database())
    parts = urlsplit(url)
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc)), name


def process_texts(pid: int) -> str:
    """A process's command line and environment as root reads them."""
    out = ""
    for name in ("cmdline", "environ"):
        with open(f"/proc/{pid}/{name}", "rb") as f:
            out += f.read().decode("latin-1")
    return out


def test_a_hostile_agent_finds_no_secret_of_the_server_and_gets_what_was_declared(tmp_path):
    admin, key, password, upstream, metrics = (secret() for _ in range(5))
    database_url, database = database_url_with_password(tmp_path, password)
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.acme]\nkeys = ["{key}"]\nenv = {{ TENANT_VAR = "for-acme" }}\n'
                       '[tenants.other]\nkeys = ["other-key"]\n')
    (tmp_path / "database-url").write_text(database_url + "\n")
    # each secret in the environment too (a flag wins over its variable; a file and the same value agree)
    env = {"CORRAL_DATABASE_URL_FILE": str(tmp_path / "database-url"), "CORRAL_DATABASE_URL": database_url,
           "CORRAL_ADMIN_TOKEN": admin, "OPENAI_API_KEY": upstream, "PASSED": "through",
           "CORRAL_METRICS_TOKEN": metrics}
    # --sandbox off: the hunter may read /proc/self/mem (the sandbox would refuse it /proc), so the
    # search covers raw memory; the environment is clean whatever the sandbox
    proc, url = start_server(tmp_path, "--admin-token", admin, "--tenants", str(tenants), "--sandbox", "off",
                             "--agent", "tests.agents.hostile:SecretHunter",
                             "--agent-env", "PASSED", "--agent-env", "SET=here", "--agent-env", "MISSING",
                             env=env, cwd=REPO)
    try:
        status, answer = call(url, "/api/mcp-command", {"command": "hunt", "args": {}, "session_id": "h1"}, token=key)
        assert status == 200, answer
        hunt = answer["result"]
        assert hunt["found"] == {} and hunt["unreadable"] == []
        environ = hunt["environ"]
        assert set(environ) == {"PATH", "LANG", "TMPDIR", "HOME", "PASSED", "SET", "TENANT_VAR"}, environ
        assert (environ["PASSED"], environ["SET"], environ["TENANT_VAR"]) == ("through", "here", "for-acme")
        assert environ["HOME"] == environ["TMPDIR"]
        # another tenant's agent gets the server-wide variables, not acme's
        status, answer = call(url, "/api/mcp-command", {"command": "hunt", "args": {}, "session_id": "o1"},
                              token="other-key")
        assert status == 200 and "TENANT_VAR" not in answer["result"]["environ"]
        # the URL came from its file; the admin token given on the command line is hidden from it
        status, health = call(url, "/health", token=admin)
        assert status == 200 and health["store"] == ("postgresql" if database else "sqlite"), health
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert SECRET_MARK.encode() not in f.read()
        assert "secret_on_command_line" in (tmp_path / "serve.log").read_text()
        # and the zygote itself holds none of it, as root reads it from outside
        zygote = next(p for p in descendants(proc.pid) if psutil.Process(p).cmdline()[0].startswith("corral: zygote"))
        assert SECRET_MARK not in process_texts(zygote)
    finally:
        proc.kill()
        proc.wait()
        if database:
            asyncio.run(drop_database(database))


def test_declared_variables_are_checked_at_start(tmp_path, capsys):
    from corral.web.cli import build_parser, config_from
    from corral.web.auth import AuthConfigError, auth_from_config

    for bad in (["--agent-env", "TMPDIR=/elsewhere"], ["--agent-env", "1X"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])
        assert "--agent-env: expected NAME or NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="CORRAL_AGENT_ENV: expected NAME or NAME=VALUE"):
        config_from(build_parser().parse_args(["serve"]), environ={"CORRAL_AGENT_ENV": "A TMPDIR=x"})
    config = config_from(build_parser().parse_args(["serve"]), environ={"CORRAL_AGENT_ENV": "A B=c"})
    assert config.agent_env == ("A", "B=c")
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[tenants.acme]\nkeys = ["k"]\nenv = { TMPDIR = "/x" }\n')
    try:
        auth_from_config(config_from(build_parser().parse_args(["serve", "--tenants", str(tenants)]), environ={}))
    except AuthConfigError as exc:
        assert "[tenants.acme]: env: 'TMPDIR'" in str(exc)
    else:
        raise AssertionError("a tenant's TMPDIR was accepted")


def test_secret_files_hold_the_secrets_and_a_bad_one_is_one_line_at_start(tmp_path):
    from corral.supervisor import Config
    from corral.supervisor.settings import SettingError

    token, url = tmp_path / "token", tmp_path / "url"
    token.write_text("  from-a-file\n")
    url.write_text("sqlite:///somewhere.sqlite3\n")
    config = Config(admin_token_file=token, database_url_file=url)
    assert (config.admin_token, config.database_url) == ("from-a-file", "sqlite:///somewhere.sqlite3")
    with pytest.raises(SettingError, match="both given"):
        Config(admin_token_file=token, admin_token="another")
    for args, env in ((["--admin-token-file", str(tmp_path / "missing")], {}),
                      ([], {"CORRAL_DATABASE_URL_FILE": str(tmp_path)})):
        done = subprocess.run([*CORRAL_MAIN, "serve", *args], env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        assert "cannot be read" in done.stderr and "Traceback" not in done.stderr


def test_the_values_of_secret_flags_are_what_the_command_line_no_longer_shows():
    from corral.web.argv_secrets import shown_argv

    shown, found = shown_argv(["corral", "serve", "--admin-token", "a1", "--database-url=postgresql://u:pw@h/d",
                               "--metrics-tok", "m1", "--port", "8080", "--", "--admin-token"])
    assert shown == ["corral", "serve", "--admin-token", "***", "--database-url=***", "--metrics-tok", "***",
                     "--port", "8080", "--", "--admin-token"]
    assert found == ["--admin-token", "--database-url", "--metrics-tok", "--admin-token"]


def test_an_unprivileged_servers_agent_finds_no_secret_either(unprivileged_uid, python_for_user, shared_dir):
    """The same hunt from an agent of a server run as an ordinary user (same uid as its agents)."""
    admin, upstream = secret(), secret()
    home = shared_dir / "server"
    home.mkdir()
    # the secrets in the server's own environment, as a unit file or a shell would have put them
    prelude = f"import os; os.environ.update(CORRAL_ADMIN_TOKEN={admin!r}, OPENAI_API_KEY={upstream!r}, PASSED='yes')"
    proc, url = serve_as_user(unprivileged_uid, python_for_user, home, "--admin-token", admin, "--sandbox", "off",
                              "--agent", "tests.agents.hostile:SecretHunter", "--agent-env", "PASSED", prelude=prelude)
    try:
        status, answer = call(url, "/api/mcp-command", {"command": "hunt", "args": {}, "session_id": "u1"})
        assert status == 200, answer
        assert answer["result"]["found"] == {} and answer["result"]["unreadable"] == []
        assert answer["result"]["environ"]["PASSED"] == "yes"
    finally:
        proc.kill()
        proc.wait()
