"""`slabcast demo` as a new user runs it, and the options every command shares."""

from __future__ import annotations

import re
import subprocess
import sys

import soundfile


def run_cli(*args, cwd=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "slabcast", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def test_demo_runs_three_workers_and_keeps_the_wav_files_it_says_it_wrote(tmp_path):
    # Issue 19: the demo said "wrote /tmp/slabcast-demo-.../wav/000000000000.wav" and then deleted it.
    result = run_cli("demo", "--duration", "3.2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    spl = [line for line in lines if line.startswith("[spl")]
    wav = [line for line in lines if line.startswith("[wav")]
    peak = [line for line in lines if line.startswith("[peak")]
    assert len(spl) == 6  # 3.2 s in 0.5 s chunks
    assert len(wav) == 2 and "(0.20 s)" in wav[1]  # one 3 s file, then the last 0.2 s (partial_tail)
    assert len(peak) == 2  # 0.5 s analysed every 2 s
    assert all("440.0 Hz" in line and "1000.0 Hz" in line for line in peak)
    out = tmp_path / "slabcast-demo"  # the default: under the current directory
    assert lines[-1].endswith(f"done, 3.2 s of audio streamed, 2 WAV files written to {out}")
    said = [re.search(r"wrote (\S+\.wav)", line).group(1) for line in wav]
    assert sorted(said) == sorted(str(p) for p in out.glob("*.wav"))
    frames = []
    for path in said:  # what it said it wrote is there, and is what was streamed
        data, rate = soundfile.read(path, dtype="int16")
        assert rate == 48_000 and data.shape[1] == 2
        frames.append(len(data))
    assert frames == [144_000, 9_600]


def test_a_bad_log_level_is_a_usage_error_naming_the_choices(tmp_path):
    result = run_cli("status", "--log-level", "verbose", "--address", str(tmp_path / "none.sock"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "argument --log-level: invalid choice: 'VERBOSE'" in result.stderr
    assert "'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'" in result.stderr
    ok = run_cli("status", "--log-level", "debug", "--address", str(tmp_path / "none.sock"))  # any case
    assert ok.returncode == 1 and "no broker at" in ok.stderr and "Traceback" not in ok.stderr
