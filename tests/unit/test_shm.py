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
