"""Recordings in audio files (WAV/RF64, FLAC, AIFF, Ogg) through soundfile: the writer, the reader, repair.

The formats and what survives a ``kill -9`` are described in :mod:`slabcast.client.record` and
docs/recording.md.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import numpy as np

from .._info import StreamInfo
from .record import FRAME_RECORD, Recording, _info_from, _LazySamples, _meta, _times_file, _Writer

# What soundfile reads each libsndfile subtype as, losslessly (8-bit subtypes come as int16, << 8).
_READ_AS = {"PCM_S8": "int16", "PCM_U8": "int16", "PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32",
            "FLOAT": "float32", "DOUBLE": "float64"}  # fmt: skip


def _from_file(data: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """Samples as soundfile read them -> the stream's dtype (8-bit streams are stored in 8-bit subtypes)."""
    if dtype == np.uint8:
        return ((data.astype(np.int32) >> 8) + 128).astype(np.uint8)
    if dtype == np.int8:
        return (data >> 8).astype(np.int8)
    return data if data.dtype == dtype else data.astype(dtype)


class _Unseekable:
    """A soundfile reader that never seeks: soundfile seeks after every read, which fails in a FLAC that
    does not say how long it is (a recorder killed before it closed the file); reading on works."""

    def __init__(self, path: str) -> None:
        import soundfile

        class Reader(soundfile.SoundFile):  # type: ignore[misc]
            def seekable(self) -> bool:
                return False

        self.file = Reader(path)
        self.position = 0

    def read(self, n: int, dtype: str) -> np.ndarray[Any, Any]:
        data = self.file.read(n, dtype=dtype, always_2d=True)
        self.position += len(data)
        return data  # type: ignore[no-any-return]

    def close(self) -> None:
        self.file.close()


def _decoded_length(path: str, dtype: str) -> int:
    """How many samples of an audio file decode, read to the end (for files whose header does not say)."""
    reader = _Unseekable(path)
    try:
        while True:
            try:
                if len(reader.read(1 << 16, dtype)) == 0:
                    break
            except RuntimeError:  # LibsndfileError: a cut last block; what came before it counts
                break
        return reader.position
    finally:
        reader.close()


class _AudioSamples(_LazySamples):
    """The samples of an audio file, through soundfile; sequential reads (a replay) go on from where the
    last one stopped, so a file of unknown length is read once, not once per frame."""

    def __init__(self, path: str, n: int, info: StreamInfo, subtype: str, seekable: bool) -> None:
        super().__init__(n, info.channels)
        self.path, self.info, self.seekable = path, info, seekable
        self.read_as = _READ_AS.get(subtype, info.dtype.name)
        self.reader: _Unseekable | None = None

    def _read(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        if self.reader is None:
            self.reader = _Unseekable(self.path)
        if self.reader.position != start and self.seekable:  # a file that says its length seeks
            self.reader.file.seek(start)
            self.reader.position = start
        elif self.reader.position > start:
            self.reader.close()
            self.reader = _Unseekable(self.path)
        while self.reader.position < start:  # skip forward by decoding (a seek may fail, see _Unseekable)
            if not len(self.reader.read(min(1 << 16, start - self.reader.position), self.read_as)):
                raise ValueError(f"{self.path}: fewer samples decode than {start}")
        return _from_file(self.reader.read(stop - start, self.read_as), self.info.dtype)


def _clip_frames(frames: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:
    """The frame records that describe the first ``n`` samples (the last one cut to fit)."""
    ends = np.cumsum(frames["n"].astype(np.int64))
    keep = min(int(np.searchsorted(ends, n, side="left")) + 1, len(frames))  # (all of them when they cover less)
    out = frames[:keep].copy()
    if len(out):
        out["n"][-1] -= max(0, int(ends[keep - 1]) - n)
        if out["n"][-1] == 0:
            out = out[:-1]
    return out


def _open_audio(path: str) -> Recording:
    try:
        import soundfile
    except ImportError as exc:
        raise ImportError("reading audio recordings needs soundfile: pip install 'slabcast[files]'") from exc
    try:
        meta_sf = soundfile.info(path)
    except Exception as exc:  # LibsndfileError (a RuntimeError) or OSError
        raise ValueError(f"{path}: not an audio file soundfile can read ({exc})") from exc
    frames = np.zeros(0, dtype=FRAME_RECORD)
    if os.path.exists(path + ".frames"):
        frames = np.fromfile(path + ".frames", dtype=FRAME_RECORD)
    if os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            info = _info_from(json.load(f), path)
    else:
        dtype = _READ_AS.get(meta_sf.subtype, "float32")
        name = "".join(c if c.isalnum() or c in "_.:-" else "_" for c in os.path.basename(path))[:64]
        info = StreamInfo(name, np.dtype(dtype), meta_sf.channels, float(meta_sf.samplerate),
                          tuple(f"ch_{i}" for i in range(meta_sf.channels)))  # fmt: skip
    # A file closed by its recorder says its length; one whose recorder was killed may not (a FLAC says
    # "unknown" until it is closed): then count what decodes. The frame records never claim more.
    n = int(meta_sf.frames)
    seekable = 0 <= n < 1 << 40
    if not seekable:
        n = _decoded_length(path, _READ_AS.get(meta_sf.subtype, "float32"))
    if len(frames):
        n = min(n, int(frames["n"].sum()))
        frames = _clip_frames(frames, n)
    else:
        step = max(1, int(info.rate or 1))
        starts = np.arange(0, n, step)
        frames = np.zeros(len(starts), dtype=FRAME_RECORD)
        frames["index"], frames["n"] = starts, np.minimum(step, n - starts)
        frames["t0"] = starts / (info.rate or 1.0)
    samples = _AudioSamples(path, n, info, meta_sf.subtype, seekable)
    return Recording(info, samples, frames, _times_file(path + ".times", n))  # type: ignore[arg-type]


_SUBTYPES = {  # (format, dtype) -> libsndfile subtype; what is missing does not fit losslessly
    ("WAV", "int16"): "PCM_16", ("WAV", "int32"): "PCM_32", ("WAV", "uint8"): "PCM_U8",
    ("WAV", "float32"): "FLOAT", ("WAV", "float64"): "DOUBLE",
    ("FLAC", "int16"): "PCM_16", ("FLAC", "int8"): "PCM_S8",
    ("FLAC", "int32"): "PCM_24",  # 24-bit samples as int32 (<< 8), what a 24-bit file source publishes
    ("AIFF", "int16"): "PCM_16", ("AIFF", "int32"): "PCM_32", ("AIFF", "float32"): "FLOAT",
}  # fmt: skip

# libsndfile commands soundfile does not wrap (sndfile.h): write the header's sizes now; write RF64 as a
# plain WAV (a JUNK chunk keeping room for RF64's ds64) while the file is under 4 GiB.
_SFC_UPDATE_HEADER_NOW = 0x1060
_SFC_RF64_AUTO_DOWNGRADE = 0x1210


def _sf_command(file: Any, command: int, value: int) -> bool:
    """A libsndfile ``sf_command`` with an int argument, through soundfile's binding; False if unavailable."""
    try:
        from soundfile import _ffi, _snd
    except ImportError:  # a soundfile without its private binding names: the files stay readable by soundfile
        return False
    return bool(_snd.sf_command(file._file, command, _ffi.NULL, value))


def _audio_format(path: str) -> str:
    """``WAV``, ``FLAC``, ``AIFF`` or ``OGG`` from a file name (a ``.wav`` is written as RF64, see below)."""
    return {".wav": "WAV", ".flac": "FLAC", ".aiff": "AIFF", ".aif": "AIFF", ".ogg": "OGG"}[
        os.path.splitext(path.lower())[1]]  # fmt: skip


def _audio_subtype(fmt: str, dtype: np.dtype[Any], rate: float | None) -> str:
    """The libsndfile subtype holding such samples losslessly in ``fmt``, or a ValueError saying why not."""
    if dtype.kind == "S":
        raise ValueError(f"{fmt} holds audio; this is a marker stream ({dtype}: strings, no rate): record it to "
                         f".xdf (beside the signals), .zarr or a directory")  # fmt: skip
    subtype = _SUBTYPES.get((fmt, dtype.name))
    if fmt == "OGG" and dtype.kind == "f":
        subtype = "VORBIS"  # lossy by design: the user asked for Ogg
    if subtype is None or not rate:
        fits = sorted({d for f, d in _SUBTYPES if f == fmt})
        wav = rate and fmt != "WAV" and (_SUBTYPES.get(("WAV", dtype.name)) is not None)
        raise ValueError(
            f"{fmt} cannot hold {dtype} samples{'' if rate else ' of a stream without a rate'} "
            f"losslessly (it takes {', '.join(fits)} with a rate); record to {'a .wav, ' if wav else ''}a .zarr "
            f"or a directory instead"
        )
    return subtype


def _open_sound_file(path: str, fmt: str, subtype: str, rate: int, channels: int) -> Any:
    """A new audio file; a WAV is RF64 that libsndfile writes as a plain WAV until it passes 4 GiB."""
    import soundfile

    if fmt != "WAV":
        return soundfile.SoundFile(path, "x", rate, channels, subtype=subtype, format=fmt)
    file = soundfile.SoundFile(path, "x", rate, channels, subtype=subtype, format="RF64")
    _sf_command(file, _SFC_RF64_AUTO_DOWNGRADE, 1)  # without it: RF64 from the start, soundfile reads it too
    return file


class _AudioWriter(_Writer):
    def __init__(self, path: str, info: StreamInfo) -> None:
        try:
            import soundfile  # noqa: F401 (the error says which extra)
        except ImportError as exc:
            raise ImportError("recording to audio files needs soundfile: pip install 'slabcast[files]'") from exc
        self.path, self.fmt = path, _audio_format(path)
        self.subtype = _audio_subtype(self.fmt, info.dtype, info.rate)
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; choose another --out")
        self.file = _open_sound_file(path, self.fmt, self.subtype, int(info.rate or 0), info.channels)
        self.written = 0
        with open(path + ".json", "x") as f:
            json.dump(_meta(info), f, indent=2)
        self.frames = open(path + ".frames", "ab")  # noqa: SIM115 (closed in close)
        if info.timestamps:
            self.times = open(path + ".times", "ab")  # noqa: SIM115

    def write(self, data: np.ndarray[Any, Any], index: int, t0: float) -> None:
        self.file.write(self._to_file(data))
        self.written += len(data)
        self.frames.write(np.array([(index, len(data), t0)], dtype=FRAME_RECORD).tobytes())

    def _to_file(self, data: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """soundfile writes float32/64, int16 and int32 arrays only: 8-bit samples go as int16 (<< 8)."""
        if data.dtype == np.uint8:
            return (data.astype(np.int16) - 128) << 8
        if data.dtype == np.int8:
            return data.astype(np.int16) << 8
        if self.subtype == "PCM_24" and np.any(data & 0xFF):
            k = int(np.flatnonzero(np.any(np.asarray(data).reshape(len(data), -1) & 0xFF, axis=1))[0])
            raise ValueError(
                f"sample {self.written + k} of {self.path} has 32 significant bits; FLAC holds 24 "
                "(int32 samples << 8, as a 24-bit file source publishes): record to .wav or .zarr"
            )
        return data

    def flush(self) -> None:
        self.frames.flush()  # the frame records first: a reader takes the shorter of them and the audio
        if self.times is not None:
            self.times.flush()
        self.file.flush()
        # A WAV's sizes are written now, so after a kill -9 any tool (not only libsndfile) reads the file
        # up to here; a FLAC says its length only once closed (see repair()).
        if self.fmt in ("WAV", "AIFF"):
            _sf_command(self.file, _SFC_UPDATE_HEADER_NOW, 0)

    def close(self) -> None:
        self.file.close()
        self.frames.close()
        if self.times is not None:
            self.times.close()

    def discard(self) -> None:
        """Remove the files of a recording refused before its first sample (closed first): an empty FLAC is a
        file no tool reads, and the sidecars would describe nothing."""
        for suffix in ("", ".json", ".frames", ".times"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + suffix)


def repair(path: str) -> int:
    """Make a recorder's audio file whole after it was killed; return the samples it now holds.

    A FLAC says how long it is only once its recorder closes it: after a ``kill -9`` soundfile reports
    2**63-1 frames and cannot read it whole. This decodes every complete FLAC block (all samples but the
    up to 4096 the encoder had not written out yet), writes them to a new file of the same format beside
    it, and renames it over ``path``; the ``.frames`` and ``.times`` sidecars are cut to match. Samples past
    the last frame record (the encoder may write a block out before the recorder's flush of the records) are
    left out, as :func:`~slabcast.open_recording` leaves them out before the repair: the repaired file holds
    what the recording held.  A WAV needs it only if data was written after its last flush. Bit-exact: the
    codecs are lossless.

    Raises
    ------
    ValueError
        If ``path`` is not an audio file soundfile can open.
    """
    import soundfile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    try:
        meta = soundfile.info(path)
    except Exception as exc:  # LibsndfileError or OSError
        raise ValueError(f"{path}: not an audio file soundfile can open ({exc})") from exc
    read_as = _READ_AS.get(meta.subtype)
    if read_as is None:
        raise ValueError(f"{path}: a {meta.subtype} file is not one slabcast record writes; nothing to repair")
    fmt = {"WAVEX": "WAV", "RF64": "WAV"}.get(meta.format, meta.format)
    tmp = path + ".repair" + os.path.splitext(path)[1]
    records = np.fromfile(path + ".frames", dtype=FRAME_RECORD) if os.path.exists(path + ".frames") else None
    limit = None if records is None else int(records["n"].astype(np.int64).sum())  # (the reader's rule)
    reader = _Unseekable(path)
    try:
        with _open_sound_file(tmp, fmt, meta.subtype, meta.samplerate, meta.channels) as out:
            while limit is None or reader.position < limit:
                want = 1 << 16 if limit is None else min(1 << 16, limit - reader.position)
                try:
                    block = reader.read(want, read_as)
                except RuntimeError:  # LibsndfileError: a block cut by the kill; everything before it is kept
                    break
                if not len(block):
                    break
                out.write(block)
    finally:
        reader.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the data is on disk before the rename replaces the original
    finally:
        os.close(fd)
    os.replace(tmp, path)
    n = reader.position
    if records is not None:
        frames = _clip_frames(records, n)
        with open(path + ".frames", "wb") as f:
            f.write(frames.tobytes())
    if os.path.exists(path + ".times"):
        os.truncate(path + ".times", min(os.path.getsize(path + ".times"), n * 8))
    return n
