"""The XDF writer alone (issue 23, items 1, 2 and 5): ClockOffset chunks every 5 s, Boundary chunks every 10 s,
what XDF cannot hold refused by name, a file cut anywhere read up to its last whole chunk."""

from __future__ import annotations

import numpy as np
import pytest

from slabcast import StreamInfo
from slabcast.client.record_xdf import BOUNDARY, XdfWriter, channel_format, read_xdf


def info(name="eeg", dtype="float32", channels=2, rate=250.0):
    return StreamInfo(name, np.dtype(dtype), channels, rate, tuple(f"c{k}" for k in range(channels)))


def test_clock_offsets_every_5_s_and_boundaries_every_10_s(tmp_path):
    path = tmp_path / "t.xdf"
    w = XdfWriter(str(path))
    sid = w.add_stream(info())
    start = w._last_offset
    for k in range(1, 26):  # 25 s of ticks, one a second
        w.tick(start + k)
        w.write(sid, np.full((250, 2), k, np.float32), 100.0 + k + np.arange(250) / 250.0)
    w.close()
    rec = read_xdf(str(path))["eeg"]
    # One at the stream's header, at 5, 10, 15, 20, 25 s, and one at the end.
    assert len(rec.clock_offsets) == 7 and set(rec.clock_offsets["value"]) == {0.0}
    assert path.read_bytes().count(BOUNDARY) == 2
    assert len(rec.samples) == 25 * 250 and len(rec.frames) == 25


def test_a_file_cut_anywhere_reads_up_to_its_last_whole_chunk(tmp_path):
    path = tmp_path / "t.xdf"
    with XdfWriter(str(path)) as w:
        sid = w.add_stream(info(dtype="uint16", channels=3, rate=None))
        ends = []
        for k in range(5):
            w.write(sid, np.full((10, 3), 60000 + k, np.uint16), np.arange(10) + 10.0 * k)
            ends.append(path.stat().st_size)
    data = path.read_bytes()
    for cut in range(ends[0] - 40, len(data), 7):
        (tmp_path / "cut.xdf").write_bytes(data[:cut])
        rec = read_xdf(str(tmp_path / "cut.xdf"))["eeg"]
        whole = sum(1 for e in ends if e <= cut)
        assert len(rec.samples) == 10 * whole and rec.info.dtype == np.uint16
        assert np.array_equal(rec.samples[:, 0], np.repeat(60000 + np.arange(whole), 10))


def test_what_xdf_cannot_hold_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"has dtype <U8; .*and markers \(S<N>: strings\)"):
        channel_format(info(dtype="<U8"))
    assert channel_format(info(dtype="S64", channels=1, rate=None)) == ("string", np.dtype("S64"))
    with pytest.raises(ValueError, match="has dtype complex64"):
        channel_format(info(dtype="complex64"))
    assert channel_format(info(dtype="uint8")) == ("int16", np.dtype("<i2"))
    (tmp_path / "x.xdf").write_bytes(b"")
    with pytest.raises(FileExistsError, match="already exists"):
        XdfWriter(str(tmp_path / "x.xdf"))
    with pytest.raises(ValueError, match="not an XDF file"):
        read_xdf(str(tmp_path / "x.xdf"))
