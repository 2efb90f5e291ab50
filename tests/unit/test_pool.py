"""The slab pool state machine, without processes: grants, retiring, cursors, pins, reader locks."""

from __future__ import annotations

import pytest

from slabcast.core.pool import CURRENT, FREE, GRANTED, RETIRED, SlabPool


class Locks:
    """Fake reader locks: slabs in `held` refuse the exclusive lock."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.taken: list[int] = []

    def take(self, slab: int) -> bool:
        if slab in self.held:
            return False
        self.taken.append(slab)
        return True

    def put(self, slab: int) -> None:
        assert self.taken and self.taken[-1] == slab, "put without take"


def pool(n: int = 4) -> tuple[SlabPool, Locks, list[int]]:
    locks, gens = Locks(), [0] * n
    return SlabPool(n, gens, locks.take, locks.put), locks, gens


def test_grant_hands_out_oldest_free_first_and_bumps_generations():
    p, _, gens = pool()
    assert p.grant(2) == [0, 1]
    assert p.grant(2) == []  # already holds two
    assert gens == [1, 1, 0, 0]
    assert p.state == [GRANTED, GRANTED, FREE, FREE]


def test_switch_retires_the_old_slab_at_the_head_index():
    p, _, _ = pool()
    p.grant(2)
    assert p.switch(0, 0) is None
    assert p.switch(1, 500) == 0
    assert p.state[:2] == [RETIRED, CURRENT]
    assert p.retired == {0: 500}
    with pytest.raises(ValueError, match="not the next granted slab"):
        p.switch(3, 600)


@pytest.mark.parametrize(
    ("floor", "pins", "freed"),
    [
        (None, 0, [0]),  # no lossless reader: free at once
        (499, 0, []),  # a block reader has not read the last sample yet
        (500, 0, [0]),  # it has
        (10**9, 1, []),  # a broker-cut chunk is still out
    ],
)
def test_advance_frees_retired_slabs_behind_every_cursor_and_pin(floor, pins, freed):
    p, _, _ = pool()
    p.grant(2)
    p.switch(0, 0)
    p.switch(1, 500)
    p.pins[0] = pins
    assert p.advance(floor) == freed
    assert (p.state[0] == FREE) == bool(freed)


def test_a_slab_a_reader_holds_is_skipped_not_reused_and_keeps_its_generation():
    p, locks, gens = pool(3)
    p.grant(2)
    p.switch(0, 0)
    p.switch(1, 100)
    p.advance(None)  # slab 0 free again; slab 2 was free all along
    locks.held.add(2)
    assert p.grant(2) == [0]  # 2 is locked by a reader: passed over
    assert gens[2] == 0 and p.locked_skips == 1
    locks.held.clear()
    p.switch(2 if p.granted[0] == 2 else 0, 200)
    assert p.grant(3)  # the lock went: it can be handed out


def test_gated_names_the_slab_a_cursor_holds_back():
    p, _, _ = pool()
    p.grant(2)
    p.switch(0, 0)
    p.switch(1, 300)
    assert p.gated(100) == 0
    assert p.gated(300) is None
    assert p.gated(None) is None


def test_close_returns_granted_slabs():
    p, _, _ = pool()
    p.grant(2)
    p.close()
    assert not p.granted and sorted(p.free) == [0, 1, 2, 3]
