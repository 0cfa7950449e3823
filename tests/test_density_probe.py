"""bench/density.py's probe of the kernel's per-memory-cgroup shrinker map (issue 21's kmalloc-1k per session)."""
import os

import pytest

from bench import density

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or density.memory_cgroup_root() is None,
                                reason="needs root and a memory cgroup controller")


def test_each_memory_cgroup_takes_whole_kmalloc_1k_units_and_the_probe_leaves_none():
    root = density.memory_cgroup_root()
    before = set(os.listdir(root))
    per_cgroup = density.shrinker_map_bytes(count=30)
    assert per_cgroup is not None
    # one 1 KiB object per 64 shrinker ids the host ever had: at least one (the host's own
    # superblocks), measured whole on a quiet slab cache, give or take other allocations meanwhile
    assert per_cgroup >= 1024
    assert set(os.listdir(root)) == before
