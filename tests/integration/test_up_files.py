"""Issue 12: `slabcast up` running the real job on a real audio file, through the file source and through stdin:
every sample accounted for, recordings read back with soundfile, `up` exiting 0 when the stream ends."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile")

RATE = 48000


def speech_like(seconds: float) -> np.ndarray:
    """2-channel int16 audio of a known content (a chirp and a tone), 2.75 s: not a whole number of chunks."""
    t = np.arange(int(seconds * RATE)) / RATE
    left = 0.5 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    right = 0.25 * np.sin(2 * np.pi * 1000 * t)
    return (np.stack([left, right], axis=1) * 32767).astype(np.int16)


def config(tmp_path: Path, source: str) -> Path:
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        f"{source}"
        "[[tasks]]\nname = 'spl'\ncall = 'slabcast.examples:spl'\nstream = 'speech'\nseconds = 0.5\nclip = true\n"
        "[[tasks]]\nname = 'recorder'\ncall = 'slabcast.examples:flac_file'\nstream = 'speech'\nseconds = 1.0\n"
        f"clip = true\npartial_tail = true\noptions = {{ out = '{tmp_path}/flac', rate = {RATE} }}\n"
    )
    return cfg


def check_run(result: subprocess.CompletedProcess, tmp_path: Path, audio: np.ndarray) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every task finished its stream" in result.stdout
    files = sorted((tmp_path / "flac").glob("*.flac"))
    back = np.concatenate([soundfile.read(str(f), dtype="int16")[0] for f in files])
    assert len(files) == 3  # 1 s, 1 s and the partial 0.75 s: nothing lost at the end
    assert np.array_equal(back, audio)
    levels = [line for line in result.stdout.splitlines() if line.startswith("[spl")]
    assert len(levels) == 5  # 2.75 s in whole 0.5 s chunks
    assert re.search(r"ch0=\s+-9\.0 dBFS", levels[0]), levels[0]  # a 0.5 amplitude chirp: -3 - 6 dB, against int16's full scale


def test_up_with_the_file_source_records_every_sample_and_exits_0(tmp_path):
    audio = speech_like(2.75)
    wav = tmp_path / "speech.wav"
    soundfile.write(str(wav), audio, RATE, subtype="PCM_16")
    cfg = config(tmp_path, f"[[sources]]\nkind = 'file'\nname = 'speech'\npath = '{wav}'\n")
    result = subprocess.run([sys.executable, "-m", "slabcast", "up", str(cfg)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    check_run(result, tmp_path, audio)


def test_up_with_a_paced_stdin_pipe_keeps_sample_clock_time_and_exits_0(tmp_path):
    audio = speech_like(2.75)
    source = ("[[sources]]\nkind = 'stdin'\nname = 'speech'\ndtype = 'int16'\nchannels = 2\nrate = 48000\n"
              "pace = true\nspeed = 4.0\n")  # fmt: skip
    cfg = config(tmp_path, source)
    result = subprocess.run([sys.executable, "-m", "slabcast", "up", str(cfg)], input=audio.tobytes(),
                            capture_output=True, timeout=60)  # fmt: skip
    decoded = subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                          result.stderr.decode())  # fmt: skip
    check_run(decoded, tmp_path, audio)
    # Sample-clock timestamps: chunk k of 0.5 s starts 0.5 s of stream time after chunk k-1, exactly,
    # although the pipe was paced at 4x (speed changes when samples go out, not their time).
    t0 = [float(line.split("t0=")[1].split()[0]) for line in decoded.stdout.splitlines() if line.startswith("[spl")]
    assert np.allclose(np.diff(t0), 0.5, atol=1.5e-3)  # printed to the millisecond


def test_a_pool_that_does_not_fit_dev_shm_is_refused_with_how_to_fix_it(tmp_path):
    cfg = tmp_path / "big.toml"
    cfg.write_text(
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nslab_bytes = 1073741824\nnslabs = 4096\n"
        "[[tasks]]\nname = 'spl'\ncall = 'slabcast.examples:spl'\nstream = 'mic'\nseconds = 0.5\n"
    )
    result = subprocess.run([sys.executable, "-m", "slabcast", "up", str(cfg)], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    assert result.returncode == 2
    assert "need 4194309 MiB of /dev/shm" in result.stderr and "docker run --shm-size=" in result.stderr  # (and the ring)


def test_a_restarted_lossless_task_is_told_what_it_missed(tmp_path):
    cfg = tmp_path / "crash.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        "[[sources]]\nkind = 'synthetic'\nname = 'live'\nrate = 8000\nchannels = 1\nframe = 80\n"
        "[[tasks]]\nname = 'crashy'\ncall = 'tests.integration.workers:crash_after'\nstream = 'live'\nsize = 800\n"
        "options = { n = 20 }\n"  # 2 s of stream per worker: long enough for the supervisor to see its progress
    )
    proc = subprocess.Popen([sys.executable, "-m", "slabcast", "up", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent.parent)  # fmt: skip
    try:
        pattern = re.compile(r"task crashy#0 restarted at stream index (\d+): samples (\d+)\.\.(\d+) \((\d+)\)")
        deadline = time.monotonic() + 40
        for line in proc.stderr:  # the workers' log lines reach up's standard error
            m = pattern.search(line)
            if m:
                start, first, last, count = map(int, m.groups())
                assert first < start and last == start - 1 and count == start - first > 0
                break
            assert time.monotonic() < deadline, "no missed-range line"
        else:
            raise AssertionError("up ended without the line")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "task crashy#0 exited with code 1; restart 1 in 0.5 s" in out
