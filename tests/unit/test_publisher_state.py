"""The publisher's rules (grants, the carry, the notice cap, batching) on PublisherState alone: no socket, no clock."""

from __future__ import annotations

import math

import pytest

from slabcast.client._pubstate import (
    AT_ONCE,
    BATCH,
    BATCHED,
    FULL,
    OPENED,
    SPORADIC,
    SWITCH_DELAY,
    Batch,
    PublisherState,
)

HEADER = 4096
SLAB = 65536
RESERVE = 16384
SAMPLE = 4


def state(carry: int = 4096, cap: int = 1000) -> PublisherState:
    return PublisherState(reserve=RESERVE, carry=carry, frame_cap=cap, sample_bytes=SAMPLE)


def start(st: PublisherState, slab: int) -> int:
    """What the publisher does on a slab change: returns the data start (and the carry the state asked)."""
    base = HEADER + slab * SLAB
    st.switch(base, SLAB)
    st.offset = base + RESERVE
    return base + RESERVE


# ------------------------------------------------------------ the carry and its confirmation


def test_carried_waits_for_the_frame_of_a_slab_change_made_with_the_old_carry():
    st = state()
    start(st, 0)
    assert not st.switch_unsent and not st.fresh  # the first slab is no change the broker must hear of
    start(st, 1)
    assert st.fresh and not st.switch_unsent  # due once its first frame is in the ring
    st.first_frame(0.0)
    assert st.switch_unsent
    assert st.on_carry(8192) is None  # not yet: the change in flight carried 4096
    assert st.carry == 8192  # but the next slab carries the new amount
    assert st.frame_sent() == 8192  # right after the PUBLISHED that announced the change
    assert st.frame_sent() is None  # once
    assert st.on_carry(2048) == 2048  # no change in flight: confirmed at once


def test_only_the_last_carry_asked_during_a_change_is_confirmed():
    st = state()
    start(st, 0)
    start(st, 1)
    assert st.on_carry(8192) is None
    assert st.on_carry(1024) is None
    st.first_frame(0.0)
    assert st.frame_sent() == 1024


@pytest.mark.parametrize(("asked", "kept"), [(0, 0), (4096, 4096), (RESERVE, RESERVE), (10 * RESERVE, RESERVE)])
def test_the_carry_never_exceeds_the_carried_part(asked, kept):
    assert state(carry=asked).carry == kept
    st = state()
    assert st.on_carry(asked) == kept


def test_the_first_slab_carries_nothing_and_later_ones_the_carry_of_their_change():
    st = state(carry=4096)
    assert st.switch(HEADER, SLAB) == 0
    assert (st.slab_carry, st.slab_data, st.end) == (0, HEADER + RESERVE, HEADER + SLAB)
    st.on_carry(8192)
    st.offset = st.slab_data + 10_000  # more written than the carry
    assert st.switch(HEADER + SLAB, SLAB) == 8192
    assert st.slab_carry == 8192


# ------------------------------------------------------------ grants and slab changes


def test_grants_are_used_in_the_order_the_broker_gave_them():
    st = state()
    for slab in (3, 1, 2):
        st.grants.append(slab)
    assert [st.grants.popleft() for _ in range(3)] == [3, 1, 2]


def test_a_frame_that_does_not_fit_needs_a_new_slab():
    st = state()
    assert st.needs_slab(SAMPLE)  # no slab yet
    data = start(st, 0)
    room = SLAB - RESERVE
    assert not st.needs_slab(room)
    st.offset = data + room - SAMPLE
    assert not st.needs_slab(SAMPLE)
    assert st.needs_slab(2 * SAMPLE)


def test_the_frame_cap_is_a_hard_bound_and_a_slab_change_carries_only_what_is_contiguous():
    # An early move once waited until the slab held the whole carry: in the first slab, or one whose carry
    # was raised, that could take a notice per sample, past any queue (review finding 1).
    st = state(carry=4096, cap=3)
    data = start(st, 0)
    st.slab_frames = 3
    st.offset = data + 4096 - SAMPLE
    assert st.needs_slab(SAMPLE)  # the cap, whatever the carry
    assert st.switch(HEADER + SLAB, SLAB) == 4096 - SAMPLE  # all there is: nothing of another slab, or of nothing
    assert st.slab_frames == 0


def test_what_is_carried_grows_slab_by_slab_until_the_carry_then_stays_full():
    st = state(carry=4096, cap=1)
    data = start(st, 0)
    st.offset = data + 1024
    data = start(st, 1)
    assert st.slab_carry == 1024
    st.offset = data + 1024
    data = start(st, 2)
    assert st.slab_carry == 2048  # the same first index on: the carried tail and what came after it
    st.offset = data + 4096
    start(st, 3)
    assert st.slab_carry == 4096  # full: the carry
    st.on_carry(8192)  # a raise: grows again from where it is
    st.offset = st.slab_data + 1024
    start(st, 0)
    assert st.slab_carry == 4096 + 1024


# ------------------------------------------------------------ batching


def test_a_sporadic_writer_sends_each_frame_at_once():
    st = state()
    assert st.place(0, 100, 1, SAMPLE, 0.0, now=1.0) == AT_ONCE
    assert st.offset == 100 + SAMPLE
    st.last_send = 1.0  # (the publisher notes when it sent)
    assert st.place(1, 104, 1, SAMPLE, 0.0, now=1.0 + SPORADIC) == AT_ONCE
    st.last_send = 1.0 + SPORADIC
    assert st.place(2, 108, 1, SAMPLE, 0.0, now=1.0 + 1.5 * SPORADIC) == OPENED  # a fast writer batches
    assert st.pend_n == [1]


def test_a_frame_joins_an_open_batch_whatever_the_time_and_a_jump_sends_the_batch_first():
    st = state()
    st.last_send = 1.0
    assert st.place(0, 100, 2, 2 * SAMPLE, 5.0, now=1.0) == OPENED  # the flusher must send it in time
    assert st.place(2, 108, 3, 3 * SAMPLE, 5.5, now=1e9) == BATCHED
    assert st.place(5, 120, 1, SAMPLE, 6.0, now=1e9, jump=True) == AT_ONCE  # after the batch (caller sends it)
    assert st.pend_n == [2, 3]
    assert st.offset == 124


def test_a_batch_is_full_at_its_size_and_goes_as_one_notice():
    st = state()
    st.last_send = 1.0
    for i in range(BATCH - 1):
        assert st.place(i, 1000 + SAMPLE * i, 1, SAMPLE, float(i), now=1.0) == (OPENED if i == 0 else BATCHED)
    assert st.place(BATCH - 1, 1000 + SAMPLE * (BATCH - 1), 1, SAMPLE, float(BATCH - 1), now=1.0) == FULL
    batch = st.take_batch(now=7.0)
    assert batch == Batch((0, 1000, (1,) * BATCH, tuple(float(i) for i in range(BATCH))))
    assert st.last_send == 7.0
    assert st.take_batch(now=8.0) is None
    assert st.place(0, 0, 1, SAMPLE, 0.0, now=7.0) == OPENED  # a new batch


def test_a_batch_of_one_frame_is_a_plain_notice():
    st = state(carry=4096)
    start(st, 0)
    st.on_carry(4096)
    st.offset += 8192  # written in slab 0: more than the carry
    start(st, 1)
    st.last_send = 1.0
    assert st.place(10, 500, 3, 3 * SAMPLE, 2.5, now=1.0) == OPENED
    assert st.take_batch(now=1.0) == Batch((10, 500, 3, 2.5))


def test_an_empty_batch_sends_nothing_and_keeps_the_last_send_time():
    st = state()
    st.last_send = 3.0
    assert st.take_batch(now=9.0) is None
    assert st.last_send == 3.0


def test_a_slab_change_is_due_only_once_its_first_frame_is_in_the_ring_and_so_is_the_carried():
    # The publisher's background thread may send a PUBLISHED between a switch and the store of the new slab's
    # first frame (a review made it happen 54-413 times per run with a 10 us GIL switch interval): that one
    # announces nothing, so neither the change nor a CARRIED waiting for it may count as told.
    st = state()
    start(st, 0)
    start(st, 1)
    assert st.on_carry(8192) is None  # a change made with the old carry is in flight
    assert st.frame_sent() is None  # a PUBLISHED before its first frame: the CARRIED still waits
    assert st.fresh and not st.switch_unsent
    st.first_frame(0.0)
    assert st.switch_unsent
    assert st.frame_sent() == 8192


def test_a_slab_change_is_told_switch_delay_after_its_first_frame_and_not_again_once_sent():
    # The broker's turn on a slab change is kept SWITCH_DELAY away from the frames around it; the publisher holds
    # another granted slab meanwhile.  Not due before its first frame, due from SWITCH_DELAY on, never once told.
    st = state()
    st.grants.extend([2, 3])
    start(st, 0)
    start(st, st.grants.popleft())
    assert not st.switch_due(100.0)  # switched, first frame not in the ring yet
    st.first_frame(10.0)
    assert not st.switch_due(10.0) and not st.switch_due(10.0 + SWITCH_DELAY / 2)
    assert st.switch_due(10.0 + SWITCH_DELAY) and st.switch_due(11.0)
    st.frame_sent()
    assert not st.switch_due(11.0)
    start(st, st.grants.popleft())  # the last granted slab: the publisher would wait for the GRANT it brings
    st.first_frame(20.0)
    assert st.switch_due(20.0)


def test_a_slab_change_waits_for_the_next_while_two_granted_slabs_are_left():
    # Granted three ahead (a fast publisher), it tells about every other change: holding two, a change is never
    # due by time and not told at the next switch; holding one, it is due SWITCH_DELAY after the newest slab's first
    # frame or at the next switch; holding none, at once.  A CARRIED waiting for the change ends the wait.
    st = state()
    st.grants.extend([2, 3, 4])
    start(st, 0)
    start(st, st.grants.popleft())  # holds 3, 4
    st.first_frame(10.0)
    assert st.deferred() and st.switch_left(10.0) == math.inf and not st.switch_due(1e9)
    assert not st.tell_at_switch()
    start(st, st.grants.popleft())  # holds 4: both changes go in one PUBLISHED
    st.first_frame(20.0)
    assert not st.deferred() and st.tell_at_switch()
    assert not st.switch_due(20.0) and st.switch_due(20.0 + SWITCH_DELAY)
    st.frame_sent()
    assert not st.tell_at_switch() and not st.switch_due(1e9)
    st.grants.extend([5, 6])  # the broker's answer: three ahead again
    start(st, st.grants.popleft())
    st.first_frame(30.0)
    assert st.deferred()
    assert st.on_carry(4096) is None  # a change made with the old carry is not told yet: the CARRIED waits ...
    assert not st.deferred() and st.tell_at_switch() and st.switch_due(30.0 + SWITCH_DELAY)  # ... not for long
    assert st.frame_sent() == 4096
    st.grants.clear()
    start(st, 7)
    st.first_frame(40.0)
    assert st.switch_left(40.0) == 0.0 and st.switch_due(40.0)  # no granted slab left: at once


def test_history_counts_the_third_slab_granted_ahead_where_slabs_hold_under_a_tenth_of_a_second():
    from slabcast.client._pubargs import history_nslabs

    # 1 s at 1 MHz x 4 bytes over 64 KiB slabs (16 ms each): 62 behind, the one written, three ahead.
    assert history_nslabs(1.0, 1e6, 4, 65536) == 62 + 1 + 3
    # 30 s of 48 kHz stereo float32 over 2 MiB (5.5 s a slab): two ahead (a broker never grants three there).
    assert history_nslabs(30.0, 48000.0, 8, 2 << 20) == 6 + 1 + 2
    assert history_nslabs(0.01, 1e6, 4, 65536) == 4  # (at least 4)
