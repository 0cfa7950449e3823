"""The zygote's objects made immortal before it forks, so agents stop copying pages to count references.

An agent shares the zygote's memory until it writes to a page. CPython writes to an object every
time it takes or drops a reference to it, so an agent that merely runs the zygote's code (its
functions, code objects, modules, classes, constants) copies every page they sit on: ~0.7 MB of the
~1.75 MB an idle agent owned on CPython 3.12 (docs/benchmarks.md). Since 3.12 (PEP 683) an object
whose reference count is the immortal value is never counted: ``Py_INCREF``/``Py_DECREF`` return
without writing. The zygote gives that value to every object it holds once its imports and warm-up
are done (Instagram's Cinder does the same before forking its web workers).

Then the free blocks the zygote's object pools still have are taken by fillers held for good
(``fill_free_blocks``): an agent's own new objects would otherwise go into those holes, one copied
page each, spread over the shared pages; now they are packed into pools of their own (~0.2 MB less).

What it costs: an object made immortal is never freed. Everything marked is what the zygote holds
at that moment (the agent's modules and what they keep), which lives as long as the process in
every agent anyway. What the zygote makes afterwards (its serve loop's objects) and everything an
agent allocates are counted as usual. The fillers take ~0.7 MB once, in the zygote.

Where it is not done, and why (``unavailable``): before 3.12 there is no immortal value (a large count
is still written); a free-threaded build keeps counts elsewhere in the object; a debug build counts
references in totals; and a runtime check that an immortal object's count stays put must pass, so an
interpreter that changed the scheme (3.14 did) is left alone.
"""
from __future__ import annotations

import collections
import ctypes
import gc
import itertools
import os
import re
import sys
import sysconfig

__all__ = ["unavailable", "make_heap_immortal", "fill_free_blocks", "IMMORTAL_REFCNT"]

IMMORTAL_REFCNT = 0xFFFFFFFF  # CPython 3.12/3.13, 64-bit: _Py_IMMORTAL_REFCNT (UINT_MAX)
_SUPPORTED = ((3, 12), (3, 13))


def _refcount_field(obj) -> ctypes.c_ssize_t:
    """The object's ``ob_refcnt``, the first word of every object in a default build."""
    return ctypes.c_ssize_t.from_address(id(obj))


def unavailable() -> str | None:
    """Why this interpreter's objects cannot be made immortal here; None when they can."""
    if sys.implementation.name != "cpython" or sys.version_info[:2] not in _SUPPORTED:
        return f"needs CPython 3.12 or 3.13, not {sys.implementation.name} {sys.version.split()[0]}"
    if sys.maxsize < 2**63 - 1:
        return "needs a 64-bit build"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "a free-threaded build keeps reference counts elsewhere"
    if hasattr(sys, "gettotalrefcount"):
        return "a debug build counts references in totals"
    probe = object()  # a fresh object of our own: marking it risks nothing if the check fails
    field = _refcount_field(probe)
    field.value = IMMORTAL_REFCNT
    held = [probe] * 100  # a hundred references taken ...
    del held  # ... and dropped
    if field.value != IMMORTAL_REFCNT:
        return "this interpreter wrote an immortal object's reference count"
    return None


def make_heap_immortal() -> int:
    """Make every object the zygote holds now immortal (the collector's objects and all they refer to); how many.

    Call it last before ``gc.freeze()``: ``gc.get_objects()`` does not list frozen objects. Code
    objects are not the collector's and do not list their constants to it: their stored fields are
    walked here (not the computed ones, such as ``co_code``, which would make a new object each time).
    """
    gc.collect()  # what is garbage now would be kept for good
    pending = gc.get_objects()
    # the walk's own bookkeeping is among the collector's objects: never marked, so freed afterwards
    seen: set[int] = {id(pending)}
    seen.add(id(seen))
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        pending.extend(gc.get_referents(obj))
        if type(obj) is _CODE:
            pending.extend((obj.co_consts, obj.co_names, obj.co_name, obj.co_qualname, obj.co_filename,
                            obj.co_linetable, obj.co_exceptiontable))
        _refcount_field(obj).value = IMMORTAL_REFCNT
    return len(seen) - 2


_CODE = type(make_heap_immortal.__code__)

# One line of sys._debugmallocstats()'s table: class, size, pools, blocks in use, free blocks.
_SIZE_CLASS = re.compile(r"^\s+\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)\s*$", re.M)
# held for good and never touched, so never counted; a deque, whose blocks are malloc's, not the pools'
_FILLERS: collections.deque = collections.deque()
_FILL_ROUNDS = 4


def fill_free_blocks() -> int:
    """Take every free block of the object allocator's partly used pools with a filler held for good; how many.

    An agent's new small objects go first to the free blocks of pools the zygote left partly used,
    and each lands on a page it shares with the zygote's (immortal) objects: a copied page per
    object, scattered. With those blocks taken, its objects go to pools of its own, packed together.
    The fillers: ``object()`` (16 bytes), a float (32) and ``bytes`` of the class's size (48-512);
    the free blocks are read from ``sys._debugmallocstats()``. 0 when its table cannot be read.
    """
    filled = 0
    for _ in range(_FILL_ROUNDS):  # reading the table makes and frees objects too: a few rounds take those blocks
        counts = [(int(size), int(free)) for size, free in _SIZE_CLASS.findall(_malloc_stats())]
        total = sum(free for _, free in counts)
        if not total:
            break
        for size, free in counts:  # no ints counted, no list grown: they would take (and free) blocks themselves
            _FILLERS.extend(map(_filler(size), itertools.repeat(None, free)))
        filled += total
    return filled


def _filler(size: int):
    """A function making a new object of the allocator's size class ``size`` (its argument ignored)."""
    if size <= 16:
        return lambda _: object()
    if size <= 32:
        return lambda _: float("0.5")  # a new float each time (24 bytes)
    length = size - 33  # a bytes object takes 33 bytes and its length
    return lambda _: bytes(length)


def _malloc_stats() -> str:
    """What ``sys._debugmallocstats()`` writes to the C stderr; "" where it cannot be caught.

    Caught in a pipe, not a file: the zygote may have no writable directory, and the table (a few
    KiB) fits in a pipe's buffer, so nothing has to read while it is written.
    """
    try:
        read_end, write_end = os.pipe()
        saved = os.dup(2)
    except OSError:  # out of descriptors, or no stderr to put back
        return ""
    try:
        os.dup2(write_end, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write_end)
    with os.fdopen(read_end, "rb") as out:
        return out.read().decode(errors="replace")
