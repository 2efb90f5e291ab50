"""The lsl source's resolution, against a fake pylsl (no network): what it says when no outlet matches."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("pylsl")


class _Info:
    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name

    def type(self) -> str:
        return "EEG"

    def channel_format(self) -> int:
        return -99  # (none slabcast streams: connect stops there, past the resolution)

    def channel_count(self) -> int:
        return 8


class _FakeLsl:
    """resolve_bypred finds nothing until the outlet has appeared (``after`` calls); resolve_streams lists it."""

    cf_string = 3

    def __init__(self, after: int, listed: list[str]) -> None:
        self.after = after
        self.listed = listed
        self.looks = 0

    def resolve_bypred(self, predicate: str, minimum: int, timeout: float) -> list[Any]:
        self.looks += 1
        return [_Info("NcFakeEEG")] if self.looks > self.after else []

    def resolve_streams(self, wait_time: float) -> list[Any]:
        return [_Info(name) for name in self.listed]


def test_an_outlet_that_appears_while_the_others_are_listed_is_taken_not_said_missing() -> None:
    # A lab newcomer: "no LSL outlet matches (name='NcFakeEEG') ...; outlets visible now: NcFakeEEG (EEG)": the
    # outlet came between the resolve and the listing, which then named it as not matching.
    from slabcast.sources import LslSource

    source = LslSource(name="eeg", stream="NcFakeEEG", timeout=0.1)
    source._lsl = _FakeLsl(after=1, listed=["NcFakeEEG"])
    with pytest.raises(ValueError, match="has channel format -99"):  # (resolved: it went on to open it)
        source.connect()
    # Asked by type (no name): an outlet seen while listing may be it, looked for again (a reviewer).
    source = LslSource(name="eeg", type="EEG", timeout=0.1)
    source._lsl = _FakeLsl(after=1, listed=["NcFakeEEG"])
    with pytest.raises(ValueError, match="has channel format -99"):
        source.connect()
    # None visible: said at once, with no second look.
    source = LslSource(name="eeg", stream="NcFakeEEG", timeout=0.1)
    source._lsl = fake = _FakeLsl(after=5, listed=[])
    with pytest.raises(OSError, match=r"no LSL outlet matches .*; no LSL outlet is visible at all"):
        source.connect()
    assert fake.looks == 1
    # Others visible, none of the name asked for: said with them, at once (no second look for a typo).
    source = LslSource(name="eeg", stream="NcFakeEEG", timeout=0.1)
    source._lsl = fake = _FakeLsl(after=1, listed=["Other"])
    with pytest.raises(OSError, match=r"outlets visible now: Other \(EEG\)"):
        source.connect()
    assert fake.looks == 1
