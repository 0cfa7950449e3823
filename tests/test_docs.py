"""The docs keep up with the code."""

import json
import re
import signal
import sys
import urllib.request
from pathlib import Path

from tests.procs import start_server
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


def test_the_readme_echo_agent_says_what_the_readme_says_from_the_current_directory(tmp_path):
    code = _readme_block("python", "class Echo")
    commands = _readme_block("sh", "--agent echo:Echo")
    module, cls = re.search(r"--agent (\w+):(\w+)", commands).groups()
    (tmp_path / f"{module}.py").write_text(code)
    message = json.loads(re.search(r"-d '(\{.*?\})'", commands).group(1))["message"]
    assert f'The reply is `"{message}"`' in README.read_text()
    # The installed console script, run from the agent's directory: nothing else puts it on sys.path.
    console_script = [str(Path(sys.executable).parent / "corral")]
    proc, url = start_server(tmp_path, "--agent", f"{module}:{cls}", program=console_script, cwd=tmp_path)
    try:
        req = urllib.request.Request(url + "/api/chat", data=json.dumps({"message": message}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["reply"] == message == "hello there world"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_readme_commands_paste_as_they_are():
    text = README.read_text()
    assert not re.search(r"(?<!local)host:8080", text)  # a literal placeholder nobody can paste
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            assert not re.match(r"\s*corral ", line), f"needs the .venv/bin/ prefix: {line}"
    ports = re.findall(r"corral serve .*?--port (\d+)", text)
    assert ports and "8080" not in ports and len(set(ports)) == len(ports), ports  # the first server keeps 8080
