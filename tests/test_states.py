"""The state machine on its own."""

import ast
import inspect

import pytest

from corral.supervisor import states


def test_lifecycle_paths_are_allowed():
    path = [None, states.STARTING, states.IDLE, states.BUSY, states.IDLE, states.STOPPING, states.REAPED, states.STARTING]
    for old, new in zip(path, path[1:]):
        states.check(old, new)
    for death in (states.CRASHED, states.OOM, states.KILLED):
        states.check(states.BUSY, death)
    states.check(states.CRASHED, states.FAILED)
    states.check(states.FAILED, states.STARTING)


@pytest.mark.parametrize(
    "old,new",
    [(None, states.IDLE), (states.ENDED, states.IDLE), (states.IDLE, states.REAPED), (states.STARTING, states.BUSY + "x"),
     (states.REAPED, states.FAILED), (states.STOPPING, states.IDLE)],
)
def test_illegal_transitions_are_refused(old, new):
    with pytest.raises(states.InvalidTransition):
        states.check(old, new)


def test_every_state_is_live_or_down_and_has_an_exit():
    assert states.LIVE.isdisjoint(states.DOWN)
    for state in states.ALL:
        assert states.TRANSITIONS[state], state


def test_the_module_imports_nothing():
    tree = ast.parse(inspect.getsource(states))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
