"""The docs keep up with the code."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import free_port
from corral.supervisor.config import Config, settings
from corral.supervisor.settings import markdown_table
from corral.web.cli import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_settings_table_is_the_declarations():
    """docs/configuration.md's table is exactly what supervisor/config.py declares (regenerate it if not)."""
    text = (DOCS / "configuration.md").read_text()
    table = re.search(r"<!-- settings:.*?-->\n(.*?)<!-- end settings -->", text, re.S).group(1)
    assert table == markdown_table(Config), "run: python -m corral.supervisor.settings"


def test_every_setting_is_a_flag_with_its_default_in_help():
    """Each declared setting is a serve flag whose help shows its default and its variable."""
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {action.option_strings[0]: action for action in serve._actions if action.option_strings}
    for item in settings():
        assert f"(default {item.shown_default}) [env {item.env}]" in flags[item.flag].help, item.name


README = DOCS.parent / "README.md"


def _readme_block(lang: str, containing: str) -> str:
    """The README's first fenced ``lang`` block that contains ``containing``."""
    blocks = re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)
    return next(block for block in blocks if containing in block)


def run_readme_block(block: str, cwd: Path) -> str:
    """Run one of the README's sh blocks (it starts a server in the background) with bash; its stdout.

    The block's ports are free ones; its background server is stopped at the end.
    """
    for port in set(re.findall(r"--port (\d+)", block)):
        block = block.replace(port, str(free_port()))
    # the scratch dirs under the test's own dir, to be removed with it (not TMPDIR: the agents' temp
    # dirs go there, and pytest's is closed to the sandbox's uids)
    block = block.replace("$(mktemp -d)", f"$(mktemp -d -p {cwd.parent})")
    script = f"set -e\n{block}\nkill %1\nwait %1 || true\n"
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a server left running by a block that failed half-way
    assert proc.returncode == 0, err
    return out


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("openssl") and (README.parent / ".git").exists()),
                    reason="needs curl, openssl and a git checkout")
def test_the_readme_commands_answer_as_it_says_and_leave_nothing_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(README.parent), str(clone)], check=True, timeout=60)
    (clone / ".venv" / "bin").mkdir(parents=True)  # the README's .venv, here this environment's corral
    (clone / ".venv" / "bin" / "corral").symlink_to(Path(sys.executable).parent / "corral")
    echo = _readme_block("sh", "--agent echo:Echo")
    message = json.loads(re.search(r"-d '(\{.*?\})'", echo).group(1))["message"]
    assert f'The reply is `"{message}"`' in README.read_text()
    answer = json.loads(run_readme_block(echo, clone))
    assert answer.get("reply") == message == "hello there world", answer
    tenants = _readme_block("sh", "--tenants")
    assert "reply" in json.loads(run_readme_block(tenants, clone))
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True,
                            text=True, check=True)
    assert status.stdout == "", status.stdout  # no tenants file with a live key, no data dir, no echo.py


def test_readme_commands_paste_as_they_are():
    text = README.read_text()
    assert not re.search(r"(?<!local)host:8080", text)  # a literal placeholder nobody can paste
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            assert not re.match(r"\s*corral ", line), f"needs the .venv/bin/ prefix: {line}"
    ports = re.findall(r"corral serve .*?--port (\d+)", text)
    assert ports and "8080" not in ports and len(set(ports)) == len(ports), ports  # the first server keeps 8080
