"""``corral serve`` as users run it: a real subprocess, real HTTP, real signals."""

import json
import signal
import subprocess
import sys
import urllib.request

import psutil

from tests.procs import descendants, start_server, wait_gone


def post(url, path, body):
    """POST JSON and return the decoded answer."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def get(url, path):
    """GET JSON."""
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return json.loads(resp.read())


def test_serve_health_and_chat(tmp_path):
    proc, url = start_server(tmp_path)
    try:
        health = get(url, "/health")
        assert health["status"] == "ok" and health["limit"]["mechanism"] in ("cgroup2", "cgroup1", "rlimit")
        assert post(url, "/api/chat", {"message": "my name is Alice", "session_id": "s1"})["reply"] == "Got it: your name is Alice."
        assert post(url, "/api/chat", {"message": "what is my name?", "session_id": "s1"})["reply"] == "Your name is Alice."
        assert post(url, "/api/chat", {"message": "what is my name?", "session_id": "s2"})["reply"] == "I don't know your name yet."
        titles = {psutil.Process(pid).cmdline()[0] for pid in descendants(proc.pid)}
        assert any(t.startswith("corral: zygote") for t in titles)
        assert any(t.startswith("corral: agent sid=s1 ") for t in titles)
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_of_serve_leaves_no_agent_or_zygote(tmp_path):
    proc, url = start_server(tmp_path)
    for i in range(5):
        post(url, "/api/chat", {"message": "hello", "session_id": f"k{i}"})
    children = descendants(proc.pid)
    titles = [" ".join(psutil.Process(pid).cmdline()) for pid in children]
    assert sum(t.startswith("corral: agent") for t in titles) == 5
    assert sum(t.startswith("corral: zygote") for t in titles) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_gone(children, timeout=5.0) == []  # a loaded machine takes its time tearing down namespaces


def test_sigterm_stops_everything_cleanly(tmp_path):
    proc, url = start_server(tmp_path)
    post(url, "/api/chat", {"message": "hello", "session_id": "t1"})
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert wait_gone(children, timeout=5.0) == []  # a loaded machine takes its time tearing down namespaces
    assert list((tmp_path / "run").iterdir()) == []  # the run directory is removed


def test_bad_agent_is_a_clear_start_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from corral.web.cli import main; raise SystemExit(main())", "serve",
         "--agent", "no_such_module:Agent", "--data-dir", str(tmp_path), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "cannot load agent no_such_module:Agent" in result.stderr
    assert "Traceback" not in result.stderr


def test_flags_come_from_the_environment(tmp_path):
    from corral.web.cli import build_parser, config_from

    args = build_parser().parse_args(["serve", "--idle-timeout", "5"])
    config = config_from(args, {"CORRAL_IDLE_TIMEOUT": "9", "CORRAL_MEMORY_LIMIT": "256M", "CORRAL_MAX_AGE": "60"})
    assert config.idle_timeout == 5  # the flag wins
    assert config.memory_limit == 256 * 1024 * 1024 and config.max_age == 60
