"""corral installs under one ``corral`` namespace, beside distributions that own ``supervisor`` or ``web``."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from tests.procs import free_port, wait_for_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def run(*cmd, cwd) -> str:
    """Run a command outside the repository (whose folders would shadow the install); its output."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def chat(url: str, message: str, session_id: str) -> str:
    """One chat turn's reply."""
    body = json.dumps({"message": message, "session_id": session_id}).encode()
    with urllib.request.urlopen(urllib.request.Request(url + "/api/chat", data=body), timeout=30) as resp:
        return json.loads(resp.read())["reply"]


def test_corral_and_supervisord_share_one_environment(tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    pip, python = str(venv / "bin" / "pip"), str(venv / "bin" / "python")
    # a real (not editable) install, so the wheel's layout is what is tested; supervisord after it
    run(pip, "install", "-q", REPO, cwd=tmp_path)
    run(pip, "install", "-q", "supervisor", cwd=tmp_path)
    assert "supervisord" in run(python, "-c", "import supervisor.supervisord as s; print(s.__name__)", cwd=tmp_path)
    run(str(venv / "bin" / "supervisord"), "--version", cwd=tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [str(venv / "bin" / "corral"), "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--run-dir", str(tmp_path / "run")], cwd=tmp_path, stderr=open(tmp_path / "serve.log", "ab"))
    try:
        wait_for_port(port, server, tmp_path / "serve.log")
        assert chat(f"http://127.0.0.1:{port}", "my name is Ada", "pkg") == "Got it: your name is Ada."
    finally:
        server.kill()
        server.wait()
    # uninstalling the other distribution leaves every corral file in place
    run(pip, "uninstall", "-y", "-q", "supervisor", cwd=tmp_path)
    out = run(python, "-c", "from corral import Agent; import corral.supervisor.supervisor, corral.web.app; print(Agent.__name__)",
              cwd=tmp_path)
    assert out.strip() == "Agent"
