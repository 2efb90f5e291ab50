"""Marker streams without processes (issue 23, item 2): the dtype, strings in and out, XDF and Zarr round trips,
the refusals, and the view's marker list."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from slabcast import StreamInfo
from slabcast.client.markers import decode_markers, encode_markers, marker_dtype
from slabcast.client.record_audio import _audio_subtype
from slabcast.client.record_xdf import XdfWriter, read_xdf
from slabcast.view.frames import marker_list, pack_frame
from slabcast.wire.protocol import check_dtype

S64 = np.dtype("S64")
TEXTS = ["stim/left", "réponse ✓", "", "x" * 64]  # ASCII, UTF-8 (2- and 3-byte characters), empty, exactly full


def markers_info(name="events", max_bytes=64):
    return StreamInfo(name, marker_dtype(max_bytes), 1, None, ("marker",), ("Markers",), (), "exp-1", True)


def test_a_marker_stream_is_fixed_width_bytes_and_nothing_else_textual():
    assert check_dtype("S64") == S64 and check_dtype(np.dtype("|S1")).itemsize == 1
    for refused, hint in (("<U8", "text goes in S<N>"), (object, "text goes in S<N>"), ("S", "N >= 1"),
                          ("V8", "fixed-width bytes S<N>")):  # fmt: skip
        with pytest.raises(TypeError, match="numeric numpy dtype") as err:
            check_dtype(refused)
        assert hint in str(err.value)
    with pytest.raises(ValueError, match="max_bytes must be a positive number of bytes, got 0"):
        marker_dtype(0)


def test_strings_in_utf8_bytes_stored_strings_out():
    data = encode_markers(TEXTS, S64, "stream 'e'")
    assert data.dtype == S64 and data.shape == (4,)
    assert data.tobytes()[64:128] == "réponse ✓".encode() + b"\0" * (64 - len("réponse ✓".encode()))  # NUL padded
    assert decode_markers(data) == TEXTS and decode_markers(data[:, None]) == TEXTS
    assert decode_markers(data[None, :]) == TEXTS  # a Window's get() / get_data(): channels first, (1, n)
    assert decode_markers(encode_markers("one", S64, "s")) == ["one"]  # a str is one marker, not its letters
    assert decode_markers(encode_markers([b"bytes \xc3\xa9"], S64, "s")) == ["bytes é"]
    assert decode_markers(np.array([b"\xff\xfe"], dtype="S4")) == ["\ufffd\ufffd"]  # raw bytes never raise
    with pytest.raises(TypeError, match=r"one channel of S<N> samples .* float32"):
        decode_markers(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=r"shape \(3, 2\).*np.char.decode"):
        decode_markers(np.zeros((3, 2), S64))


def test_what_a_marker_cannot_be_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"marker 1 is 65 bytes in UTF-8, longer than stream 'e' holds \(64 bytes: "
                                         r"max_bytes=64\).*nothing was written"):  # fmt: skip
        encode_markers(["ok", "x" * 65], S64, "stream 'e'")
    with pytest.raises(ValueError, match="marker 0 is 66 bytes"):
        encode_markers(["é" * 33], S64, "stream 'e'")  # 33 characters, 66 bytes: bytes count, not characters
    with pytest.raises(ValueError, match="holds a NUL character"):
        encode_markers(["end\0"], S64, "stream 'e'")
    with pytest.raises(TypeError, match=r"a marker is a str .*got int at marker 1"):
        encode_markers(["a", 5], S64, "stream 'e'")
    with pytest.raises(ValueError, match="bytes that are not UTF-8"):
        encode_markers([b"\xff"], S64, "stream 'e'")


def test_xdf_writes_markers_as_a_string_stream_pyxdf_reads(tmp_path):
    pyxdf = pytest.importorskip("pyxdf")
    path = tmp_path / "m.xdf"
    stamps = np.array([10.25, 10.5, 11.0, 12.125])
    with XdfWriter(str(path)) as w:
        sid = w.add_stream(markers_info())
        w.write(sid, encode_markers(TEXTS[:2], S64, "s"), stamps[:2])
        w.write(sid, encode_markers(TEXTS[2:], S64, "s"), stamps[2:])
    (stream,), _ = pyxdf.load_xdf(str(path), synchronize_clocks=False, dejitter_timestamps=False)
    assert stream["info"]["channel_format"] == ["string"] and stream["info"]["nominal_srate"] == ["0.0"]
    assert stream["info"]["type"] == ["Markers"] and stream["info"]["source_id"] == ["exp-1"]
    assert stream["time_series"] == [[t] for t in TEXTS] and np.array_equal(stream["time_stamps"], stamps)
    # The chunk itself, byte for byte: per sample 8, the stamp, a varlen byte count, the UTF-8 bytes.
    raw = path.read_bytes()
    first = b"\x08" + struct.pack("<d", 10.25) + b"\x01\x09stim/left"
    assert first in raw and b"stim/left\0" not in raw  # no padding in the file
    back = read_xdf(str(path))["events"]
    assert back.info.dtype == S64 and back.info.rate is None and back.info.timestamps
    assert back.info.channel_types == ("Markers",) and back.info.channel_names == ("marker",)
    assert decode_markers(back.samples) == TEXTS and np.array_equal(back.times, stamps)
    assert list(back.frames["n"]) == [2, 2] and list(back.frames["t0"]) == [10.25, 11.0]


def test_an_xdf_string_longer_than_its_header_says_widens_the_dtype(tmp_path):
    path = tmp_path / "m.xdf"
    with XdfWriter(str(path)) as w:  # its header says S4 (as another recorder's says nothing): longer strings come
        sid = w.add_stream(markers_info(max_bytes=4))
        w.write(sid, np.array([b"abcd"], "S4"), np.array([1.0]))
        w.write(sid, np.array([b"y" * 300], "S300"), np.array([2.0]))
    back = read_xdf(str(path))["events"]
    assert back.info.dtype == np.dtype("S300") and decode_markers(back.samples) == ["abcd", "y" * 300]


def test_zarr_keeps_markers_as_strings_and_gives_the_bytes_back(tmp_path):
    zarr = pytest.importorskip("zarr")
    from slabcast.client.record import _meta
    from slabcast.client.record_zarr import ZarrWriter, create_root, open_zarr

    info = markers_info()
    writer = ZarrWriter(create_root(str(tmp_path / "m.zarr")), info, _meta(info))
    data = encode_markers(TEXTS, S64, "s")
    writer.write(data[:3], 0, 1.0)
    writer.write_times(np.array([1.0, 2.0, 3.0]))
    writer.flush()
    writer.write(data[3:], 3, 4.0)
    writer.write_times(np.array([4.0]))
    writer.close()
    stored = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")["samples"]
    assert stored.shape == (4, 1) and [str(v) for v in stored[:, 0]] == TEXTS  # strings, for any Zarr reader
    back = open_zarr(str(tmp_path / "m.zarr"))
    assert back.info.dtype == S64 and np.array_equal(back.samples[:], data[:, None])
    assert decode_markers(back.samples[1:3]) == TEXTS[1:3] and list(back.times) == [1.0, 2.0, 3.0, 4.0]


def test_audio_files_refuse_a_marker_stream_saying_where_it_goes():
    for fmt in ("WAV", "FLAC"):
        with pytest.raises(ValueError, match=rf"{fmt} holds audio; this is a marker stream \(\|S64.*\.xdf"):
            _audio_subtype(fmt, S64, None)


def test_the_view_lists_the_markers_of_the_span_shown():
    data = encode_markers(["old", "a", "b"], S64, "s")[None, :]
    part = marker_list("events", data, np.array([80.0, 95.5, 99.0]), 10.0, now=100.0)
    assert part.header["markers"] == [[95.5, "a"], [99.0, "b"]] and part.header["columns"] == 0
    assert part.arrays == [] and part.header["t_newest"] == 99.0
    frame = pack_frame(3, [part])
    (hlen,) = struct.unpack_from("<I", frame)
    assert len(frame) == 4 + hlen  # no payload
    assert json.loads(frame[4 : 4 + hlen])["streams"][0]["markers"][1] == [99.0, "b"]
