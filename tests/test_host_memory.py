"""The start-up line about the host's memory monitors (supervisor/host_memory.py): a fake sysfs tree for the
file logic, then a real ``corral serve`` on this host says it exactly when the host runs one."""

import json

from corral.supervisor import host_memory
from tests.procs import start_server


def kdamond(admin, n: int, *, state: str, operations: str, pid: int = 105) -> None:
    """A kdamond directory as DAMON's sysfs interface lays it out."""
    root = admin / "kdamonds" / str(n)
    (root / "contexts" / "0").mkdir(parents=True)
    (root / "state").write_text(state + "\n")
    (root / "pid").write_text(f"{pid}\n")
    (root / "contexts" / "0" / "operations").write_text(operations + "\n")
    (admin / "kdamonds" / "nr_kdamonds").write_text(f"{n + 1}\n")


def test_a_running_physical_memory_monitor_is_named_with_its_pid(tmp_path):
    kdamond(tmp_path, 0, state="on", operations="paddr", pid=105)
    assert host_memory.physical_monitors(str(tmp_path)) == ["kdamond 0 (pid 105)"]
    note = host_memory.note(str(tmp_path))
    assert "kdamond 0 (pid 105)" in note and f"{tmp_path}/kdamonds/N/state" in note and "10,000" in note


def test_stopped_or_virtual_address_monitors_and_hosts_without_damon_say_nothing(tmp_path):
    assert host_memory.note(str(tmp_path / "absent")) is None
    kdamond(tmp_path, 0, state="off", operations="paddr")
    kdamond(tmp_path, 1, state="on", operations="vaddr")  # one process's own memory: no walk over every agent
    assert host_memory.physical_monitors(str(tmp_path)) == []
    assert host_memory.note(str(tmp_path)) is None
    kdamond(tmp_path, 2, state="on", operations="paddr", pid=7)
    assert host_memory.physical_monitors(str(tmp_path)) == ["kdamond 2 (pid 7)"]


def test_serve_says_it_once_at_start_exactly_when_this_host_runs_one(tmp_path):
    expected = host_memory.note()
    proc, _ = start_server(tmp_path)
    try:
        records = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
        said = [r["note"] for r in records if r["event"] == "host_memory_note"]
        assert said == ([expected] if expected else [])
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
