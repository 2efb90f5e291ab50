"""Segments: memory committed on demand and given back (no broker, no processes)."""

from __future__ import annotations

import os

import pytest

from slabcast.core import shm


@pytest.fixture
def segment():
    seg = shm.Segment(f"slabcast-unit.{os.getpid()}.{os.urandom(4).hex()}", 64 << 20, commit=[(0, 4096)])
    yield seg
    seg.destroy()


def test_commit_and_release_move_the_memory_the_segment_holds(segment):
    assert segment.allocated == 4096  # a 64 MiB segment: one page of memory
    segment.commit([(1 << 20, 3 << 20), (40 << 20, 100)])
    assert segment.allocated == 4096 + (3 << 20) + 4096
    segment.buf[(1 << 20) : (1 << 20) + 5] = b"hello"
    assert segment.release([(1 << 20, 3 << 20)])
    assert segment.allocated == 4096 + 4096
    assert segment.release([(40 << 20, 10)])  # part of a page: zeroed, the page kept
    assert segment.allocated == 4096 + 4096
    # A hole reads as zeros, but reading it through a mapping allocates its page on tmpfs (a SIGBUS on a full
    # /dev/shm): readers, too, must stay within committed room.
    assert bytes(segment.buf[(1 << 20) : (1 << 20) + 5]) == b"\0" * 5
    assert segment.allocated == 4096 + 4096 + 4096


def test_without_hole_punching_release_says_so_and_keeps_everything(segment, monkeypatch):
    segment.commit([(1 << 20, 1 << 20)])
    monkeypatch.setattr(shm, "_libc_fallocate", lambda: None)
    assert not segment.release([(1 << 20, 1 << 20)])
    assert segment.allocated == 4096 + (1 << 20)


def test_committing_past_what_dev_shm_has_is_refused_before_any_page_is_taken(segment):
    free = os.statvfs(shm.SHM_DIR).f_bavail * os.statvfs(shm.SHM_DIR).f_frsize
    with pytest.raises(shm.ShmFullError, match=r"no room for \d+ more bytes"):
        segment.commit([(0, free + (1 << 30))], headroom=True)
    assert segment.allocated == 4096


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_populate_maps_committed_pages_ahead_and_allocates_no_hole(segment):
    # A publisher populates its slabs' frame areas at open (Publisher): then its first lap of the pool writes
    # without a page fault per page.  Only committed ranges are given: populating a hole would allocate it.
    segment.commit([(1 << 20, 4 << 20)])
    allocated = segment.allocated
    mm = shm.attach(segment.name, 64 << 20, writable=True)
    try:
        if not shm.populate(mm, [(1 << 20, 5 << 20), (100, 200)]):  # (a range inside one page: nothing to do)
            pytest.skip("MADV_POPULATE_WRITE is not known here (Linux before 5.14)")
        assert segment.allocated == allocated  # no hole was allocated
        before = _minor_faults()
        for at in range(1 << 20, 5 << 20, 4096):
            mm[at] = 1
        faults = _minor_faults() - before
        assert faults < 1024 // 10, f"{faults} page faults writing 1024 populated pages"  # (unpopulated: ~1024)
        before = _minor_faults()
        for at in range(8 << 20, 12 << 20, 4096):  # a range not populated: a fault per page (this test's control)
            mm[at] = 1
        assert _minor_faults() - before > 1024 // 2
    finally:
        mm.close()


def test_populate_rounds_inward_to_whole_pages_and_says_when_the_kernel_cannot():
    calls = []

    class Recording:
        def madvise(self, option, start, length):
            calls.append((option, start, length))
            if start >= 8192:
                raise OSError(22, "Invalid argument")  # a kernel before 5.14 (or ENOMEM, EFAULT: the same)

    assert not shm.populate(Recording(), [(1, 8191), (4095, 8193), (8192, 16384), (0, 4096)])  # type: ignore[arg-type]
    assert calls == [(23, 4096, 4096), (23, 8192, 8192)]  # (1, 8191) holds no whole page; stopped at EINVAL
