"""The zygote's objects made immortal before it forks (agent_proc/immortal.py): the walk in a Python of its
own, then real agents under a real supervisor with the heap immortal, with ``--immortal-heap off``, and
on an interpreter that cannot."""

import re
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from corral.agent_proc import immortal

WHY_NOT = immortal.unavailable()
needs_immortal = pytest.mark.skipif(WHY_NOT is not None, reason=f"no immortal objects here: {WHY_NOT}")
AGENT = "tests.core_agents:RefcountAgent"


def test_cpython_3_12_and_3_13_can_and_other_interpreters_are_told_why_not():
    if sys.version_info[:2] in ((3, 12), (3, 13)) and not sysconfig.get_config_var("Py_GIL_DISABLED") \
            and not hasattr(sys, "gettotalrefcount"):
        assert WHY_NOT is None
    else:
        assert WHY_NOT


@needs_immortal
def test_what_is_held_is_never_counted_again_and_what_comes_after_is_counted_and_freed():
    script = textwrap.dedent("""
        import sys, weakref
        from corral.agent_proc import immortal

        HELD = ("held by a module", object())
        class Kept:
            pass
        def kept():
            return HELD
        marked = immortal.make_heap_immortal()
        assert marked > 1000, marked
        refs = [HELD, Kept, kept, kept.__code__, HELD[1]] * 1000
        del refs
        for obj in (HELD, Kept, kept, kept.__code__, kept.__code__.co_consts, HELD[1]):
            assert sys.getrefcount(obj) == immortal.IMMORTAL_REFCNT, obj
        class Later:
            pass
        later, gone = Later(), []
        weakref.finalize(later, gone.append, "freed")
        assert sys.getrefcount(later) == 2
        del later
        assert gone == ["freed"], gone
        print("ok", marked)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stderr


WHERE_NEW_OBJECTS_GO = textwrap.dedent("""
    import gc, sys
    from corral.agent_proc import immortal

    POOL = 16 * 1024  # CPython 3.12/3.13's object allocator: pools of 16 KiB, aligned
    held = gc.get_objects()
    old = {id(o) & ~(POOL - 1) for o in held} | {id(r) & ~(POOL - 1) for o in held for r in gc.get_referents(o)}
    del held
    filled = immortal.fill_free_blocks() if sys.argv[1] == "fill" else 0
    made = [bytes(size - 33) for size in range(48, 513, 16) for _ in range(10)]  # 10 of each size class
    shared = sum(id(b) & ~(POOL - 1) in old for b in made) / len(made)
    print(filled, len(immortal._FILLERS), round(shared, 2))
""")


def where_new_objects_go(fill: bool) -> tuple[int, int, float]:
    """(blocks filled, fillers held, the share of 300 new objects put in pools the objects made before are in)."""
    out = subprocess.run([sys.executable, "-c", WHERE_NEW_OBJECTS_GO, "fill" if fill else "no"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    filled, held, shared = out.stdout.split()
    return int(filled), int(held), float(shared)


@needs_immortal
def test_new_objects_go_to_pools_of_their_own_once_the_free_blocks_are_filled():
    """What the zygote's agents then do: their objects are packed in new pages, not spread over shared ones."""
    _, _, shared_before = where_new_objects_go(fill=False)
    filled, held, shared_after = where_new_objects_go(fill=True)
    assert shared_before > 0.5  # the measure sees the spreading it is about
    assert filled > 100 and held == filled and shared_after < 0.1, (filled, held, shared_after)


@needs_immortal
async def test_agents_find_the_zygotes_objects_immortal_and_their_own_counted(make_supervisor):
    sup = await make_supervisor(agent=AGENT)
    assert re.fullmatch(r"immortal \(\d+ objects, \d+ free blocks filled\)", sup.spawner.heap), sup.spawner.heap
    for sid in ("a", "b"):  # two agents of one zygote
        held, fresh = map(int, (await sup.chat(await sup.get_or_create(sid, "default"), "hi"))["reply"].split())
        assert held == immortal.IMMORTAL_REFCNT and fresh < 10


async def test_off_leaves_every_count_as_it_was(make_supervisor):
    sup = await make_supervisor(agent=AGENT, immortal_heap="off")
    assert sup.spawner.heap == "counted (--immortal-heap off)"
    held, fresh = map(int, (await sup.chat(await sup.get_or_create("c", "default"), "hi"))["reply"].split())
    assert held < 1000 and fresh < 10


@pytest.mark.skipif(WHY_NOT is None, reason="this interpreter has immortal objects")
async def test_an_interpreter_without_them_says_why_and_counts_as_before(make_supervisor):
    sup = await make_supervisor(agent=AGENT)
    assert sup.spawner.heap == f"counted ({WHY_NOT})"
    held, _ = map(int, (await sup.chat(await sup.get_or_create("d", "default"), "hi"))["reply"].split())
    assert held < 1000
