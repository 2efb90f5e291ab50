"""`slabcast up` with the example config: tasks in their own processes, restarts, clean stop; status."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import slabcast
from slabcast.core.shm import pid_alive

CONFIG = Path(__file__).parent.parent.parent / "broker" / "slabcast.toml"


class Lines:
    """The output lines of a process, read on a thread so waits can time out."""

    def __init__(self, stream):
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.q.put(line.rstrip("\n"))
        self.q.put("<eof>")

    def expect(self, pattern, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
            assert line != "<eof>", f"output ended before {pattern!r}: {self.seen[-20:]}"


@contextlib.contextmanager
def running_up(cfg):
    """`slabcast up CFG` in its own session; yields (process, its output lines); killed if still running after."""
    proc = subprocess.Popen([sys.executable, "-m", "slabcast", "up", str(cfg)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        yield proc, Lines(proc.stdout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_up_runs_tasks_restarts_a_killed_worker_and_stops_cleanly(tmp_path):
    address = f"ipc://{tmp_path}/b.sock"
    env = {**os.environ, "SLABCAST_ADDRESS": address}
    proc = subprocess.Popen([sys.executable, "-m", "slabcast", "up", str(CONFIG)], stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)  # fmt: skip
    lines = Lines(proc.stdout)
    try:
        broker_pid = int(lines.expect(r"broker (\d+) serving")[1])
        pids = {}
        for _ in range(3):
            m = lines.expect(r"task (\w+)#0 started, pid (\d+)")
            pids[m[1]] = int(m[2])
        assert set(pids) == {"spl", "recorder", "model"}
        assert len(set(pids.values()) | {broker_pid, proc.pid}) == 5  # each task its own process
        lines.expect(r"^\[spl")  # the SPL task is receiving chunks
        lines.expect(r"^\[peak")  # so is the model task
        deadline = time.monotonic() + 30  # (the recorder prints nothing: wait for its subscription, bounded)
        while True:
            status = slabcast.broker_status(address)
            (mic,) = status["streams"]
            subs = {s["label"]: s for s in mic["subscribers"]}
            if "task:recorder#0" in subs:
                break
            assert time.monotonic() < deadline, f"the recorder never subscribed: {sorted(subs)}"
            time.sleep(0.05)
        assert subs["task:spl#0"]["size"] == 24_000 and subs["task:spl#0"]["policy"] == "drop"
        assert subs["task:recorder#0"]["size"] == 480_000 and subs["task:recorder#0"]["policy"] == "block"
        assert subs["task:model#0"]["pid"] == pids["model"]

        os.kill(pids["spl"], signal.SIGKILL)
        lines.expect(r"task spl#0 exited with code -9; restart 1 in 0.5 s")
        new_pid = int(lines.expect(r"task spl#0 started, pid (\d+)")[1])
        assert new_pid != pids["spl"]
        lines.expect(r"^\[spl")  # the restarted worker receives chunks again

        proc.send_signal(signal.SIGINT)
        lines.expect(r"stopped \(broker exit code 0, 1 restarts\)")
        # What the restarted worker missed, summed up at the end (a newcomer: only in a worker's log line).
        assert int(lines.expect(r"task spl#0 did not process (\d+) samples, across its 1 restart")[1]) > 0
        assert proc.wait(15) == 0
        for pid in [broker_pid, new_pid, *pids.values()]:
            assert not pid_alive(pid), f"process {pid} was left running"
        assert not Path(f"{tmp_path}/b.sock").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("to", ["up", "group", "cgroup"])
def test_stopping_up_lets_the_tasks_finish_their_streams_with_the_partial_tail(tmp_path, to):
    # Ctrl-C or SIGTERM: the sources end their streams, a lossless task gets every sample up to the end,
    # the last shorter chunk included, and no callback is cut off in the middle.  "group": SIGTERM to every
    # process of up's group (timeout(1), `kill -- -PGID`), which the workers died of mid-stream (a newcomer:
    # "exited with code 143 before the end of its stream", up exit 1, the last partial file lost); they leave
    # it to up, which stops them after their stream.  "cgroup": the broker too, as systemd's default
    # KillMode=control-group does (a reviewer: it shut down at once); up's broker only ends its sources' streams.
    tally = tmp_path / "tally.txt"
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 8000\nchannels = 1\nframe = 80\n"
        "[[tasks]]\nname = 'rec'\ncall = 'tests.integration.workers:tally'\nstream = 'mic'\nsize = 8001\n"
        f"clip = true\npartial_tail = true\npolicy = 'block'\noptions = {{ out = '{tally}' }}\n"
    )
    with running_up(cfg) as (proc, lines):
        broker_pid = int(lines.expect(r"broker (\d+) serving")[1])
        lines.expect(r"^\[tally\] \d+ 8001", timeout=30)
        lines.expect(r"^\[tally\] \d+ 8001", timeout=30)
        if to == "up":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)  # up and its workers alike (the broker has a session of its own)
            if to == "cgroup":
                os.kill(broker_pid, signal.SIGTERM)
        lines.expect(r"task rec#0 finished its stream", timeout=30)
        lines.expect(r"stopped \(broker exit code 0, 0 restarts\)", timeout=30)
        assert proc.wait(15) == 0
    rows = [tuple(map(int, line.split())) for line in tally.read_text().splitlines()]
    assert len(rows) >= 3
    assert all(n == 8001 and not partial for _, n, partial in rows[:-1])
    assert all(rows[k + 1][0] == rows[k][0] + rows[k][1] for k in range(len(rows) - 1)), rows  # contiguous
    _, n, partial = rows[-1]
    assert partial and 0 < n < 8001  # the stream ended on a frame of 80, never on a chunk of 8001 here


def test_a_worker_restarted_after_its_file_stream_ended_says_what_it_missed_and_up_ends(tmp_path):
    # A newcomer: a file source (pace = false) wrote the whole file into the pool at once and ended; the block
    # recorder, behind, was killed; the stream went with its last reader, and the restarted worker waited for it
    # for ever, up with it (then said "its stream never appeared"); the samples it missed were named nowhere.
    soundfile = pytest.importorskip("soundfile")
    wav = tmp_path / "take.wav"
    soundfile.write(str(wav), (np.arange(16000) % 1000).astype(np.int16), 8000, subtype="PCM_16")
    tally = tmp_path / "tally.txt"
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        f"[[sources]]\nkind = 'file'\nname = 'take'\npath = '{wav}'\n"
        "[[tasks]]\nname = 'rec'\ncall = 'tests.integration.workers:slow_tally'\nstream = 'take'\nsize = 800\n"
        f"clip = true\npolicy = 'block'\noptions = {{ out = '{tally}', delay = 0.3 }}\n"
    )
    with running_up(cfg) as (proc, lines):
        pid = int(lines.expect(r"task rec#0 started, pid (\d+)")[1])
        lines.expect(r"^\[tally\] 0 800$", timeout=30)
        lines.expect(r"^\[tally\] 800 800$", timeout=30)  # (the file is in the pool: its stream has ended)
        os.kill(pid, signal.SIGKILL)
        lines.expect(r"task rec#0 exited with code -9; restart 1", timeout=30)
        m = lines.expect(r"task rec#0: its stream ended before this restart and is gone: the samples from stream "
                         r"index (\d+) to its end, if any, were not processed", timeout=30)  # fmt: skip
        assert int(m[1]) >= 800  # (where its predecessor had processed to)
        lines.expect(r"every task finished its stream", timeout=30)
        lines.expect(rf"task rec#0 did not process the samples from stream index {m[1]} to its stream's end, if "
                     r"any, across its 1 restart", timeout=30)  # fmt: skip
        assert proc.wait(30) == 0


def test_one_ctrl_c_relayed_twice_is_one_stop_not_a_second_ctrl_c(tmp_path):
    # A newcomer: Ctrl-C on `timeout 90 slabcast up ...` in a terminal reaches up twice within milliseconds (the
    # terminal's SIGINT, then timeout's relay), taken as "Ctrl-C again: stop now" 4 tries in 4: a task behind its
    # stream was stopped short ("had not finished its stream when Ctrl-C came again").  One stop: it finishes.
    tally = tmp_path / "tally.txt"
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 8000\nchannels = 1\nframe = 80\n"
        "[[tasks]]\nname = 'rec'\ncall = 'tests.integration.workers:slow_tally'\nstream = 'mic'\nsize = 801\n"
        f"clip = true\npartial_tail = true\npolicy = 'block'\noptions = {{ out = '{tally}', delay = 0.15 }}\n"
    )  # (exact chunks of 801: a stream of 80-sample frames ends inside one, before 64,080 samples)
    with running_up(cfg) as (proc, lines):
        for _ in range(6):  # (0.15 s of work for each 0.1 s chunk: behind its stream)
            lines.expect(r"^\[tally\] \d+ 801$", timeout=30)
        proc.send_signal(signal.SIGINT)  # the terminal's
        time.sleep(0.02)  # (a relay's delay: two signals sent at once would merge into one pending signal)
        proc.send_signal(signal.SIGINT)  # timeout's relay of it
        lines.expect(r"task rec#0 finished its stream", timeout=30)
        lines.expect(r"stopped \(broker exit code 0, 0 restarts\)", timeout=30)
        assert proc.wait(15) == 0
    rows = [tuple(map(int, line.split())) for line in tally.read_text().splitlines()]
    assert rows[-1][2] == 1  # the partial tail: the stream was finished
    assert all(rows[k + 1][0] == rows[k][0] + rows[k][1] for k in range(len(rows) - 1)), rows  # contiguous


def test_a_task_behind_its_stream_at_the_stop_is_stopped_after_its_stop_timeout_and_said(tmp_path):
    # A newcomer: a worker still busy 10 s after the stop was cut off without a word, and up exited 0.  Now up
    # names every worker: one still busy after its own task's stop_timeout is stopped then, with the index it had
    # read to; one that crashes on its last chunks is named too; and up exits 1 (the run did not do all it was
    # asked).  A reviewer: a short stop_timeout waited for the longest, and a crash in the drain went unsaid.
    tallies = {name: tmp_path / f"{name}.txt" for name in ("short", "long", "tail")}
    # (the tail task's exact chunks of 8011 samples: a stream of 80-sample frames ends inside one before 640,880
    # samples, 80 s; chunks not clipped end on a frame boundary, and one stream in eleven ended on one of 880)
    task = ("[[tasks]]\nname = '{name}'\ncall = 'tests.integration.workers:{call}'\nstream = 'mic'\nsize = {size}\n"
            "policy = 'block'\n{more}\noptions = {{ out = '{out}'{opt} }}\n")  # fmt: skip
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 8000\nchannels = 1\nframe = 80\n"
        + task.format(name="short", call="slow_tally", size=800, more="stop_timeout = 1", out=tallies["short"],
                      opt=", delay = 1.0")
        + task.format(name="long", call="slow_tally", size=800, more="stop_timeout = 3", out=tallies["long"],
                      opt=", delay = 1.0")
        + task.format(name="tail", call="fail_on_tail", size=8011, more="clip = true\npartial_tail = true\nmax_failures = 1",
                      out=tallies["tail"], opt="")
    )
    with running_up(cfg) as (proc, lines):
        for _ in range(10):  # (the slow two take a second for each 0.1 s chunk: behind)
            lines.expect(r"^\[tally\] \d+ (800|8011)$", timeout=30)
        proc.send_signal(signal.SIGTERM)
        said = {}
        for _ in range(3):
            m = lines.expect(r"task (\w+)#0 (had not finished its stream (\d s after the stop|when Ctrl-C came "
                             r"again): stopped at stream index (\d+); the samples after it|exited with code 1 before "
                             r"the end of its stream)", timeout=30)  # fmt: skip
            said[m.group(1)] = m
            if m.group(1) == "short":
                proc.send_signal(signal.SIGTERM)  # again: the long one is stopped now, not 3 s after the stop
        assert proc.wait(30) == 1
    assert said["short"].group(3) == "1 s after the stop" and said["long"].group(3) == "when Ctrl-C came again"
    assert "exited with code 1" in said["tail"].group(2)
    # In the order they came: the short timeout did not wait for the long one.
    order = list(said)
    assert order.index("short") < order.index("long"), order
    # Where each had processed to: the end of its last chunk whose callback returned (a newcomer: with long chunks
    # the index read was stale, and named samples as processed that were not; after a second Ctrl-C, the line came
    # before the callback in progress returned and named its chunk as not processed).
    for name in ("short", "long"):
        done = [tuple(map(int, row.split())) for row in tallies[name].read_text().splitlines()]
        assert int(said[name].group(4)) == done[-1][0] + 800, name


def test_a_task_whose_stream_never_appeared_is_stopped_at_once_and_said(tmp_path, stream_name):
    # A lab newcomer: Ctrl-C before the LSL device appeared waited 10 s, then said the task "had not finished its
    # stream" and exited 1, of a stream that never existed.
    pytest.importorskip("pylsl", reason="the lsl extra: pip install 'slabcast[lsl]'")
    address = f"ipc://{tmp_path}/b.sock"
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = '{address}'\n"
        f"[[sources]]\nkind = 'lsl'\nname = 'eeg'\nstream = 'absent-{stream_name}'\ntimeout = 0.5\n"
        f"[[tasks]]\nname = 'rec'\ncall = 'tests.integration.workers:tally'\nstream = 'eeg'\nsize = 10\n"
        f"options = {{ out = '{tmp_path / 'tally.txt'}' }}\n"
    )
    with running_up(cfg) as (proc, lines):
        lines.expect(r"task rec#0 started", timeout=30)
        deadline = time.monotonic() + 30  # (its SUBSCRIBE waits at the broker: then it is waiting for the stream)
        while not slabcast.broker_status(address)["waiting"].get("eeg"):
            assert time.monotonic() < deadline, "the task never subscribed"
            time.sleep(0.05)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        lines.expect(r"task rec#0 stopped: its stream 'eeg' never appeared", timeout=30)
        assert time.monotonic() - t < 8.0  # not after its stop_timeout of 10 s
        assert proc.wait(30) == 0  # (the broker's stop may wait for liblsl's resolve, up to 5 s more)
    assert not (tmp_path / "tally.txt").exists()


def test_signals_in_a_burst_stop_up_at_once_and_never_hang_it(tmp_path):
    # Its handlers once took a lock (Event.set): a second signal inside the first handler hung `up` for good.
    cfg = tmp_path / "up.toml"
    cfg.write_text(f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n" + SOURCE + TASK)
    with running_up(cfg) as (proc, lines):
        lines.expect(r"^\[peak", timeout=30)
        for sig in [signal.SIGINT, signal.SIGTERM] * 10:  # (another signal: "stop now", the tasks' drain skipped)
            proc.send_signal(sig)
        lines.expect(r"stopped \(broker exit code 0, 0 restarts\)", timeout=30)
        assert proc.wait(15) == 0


SOURCE = "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 48000\nchannels = 2\n"
TASK = ("[[tasks]]\nname = 'spl'\ncall = 'slabcast.examples:spectral_peak'\nstream = 'mic'\nseconds = 0.5\n"
        "policy = 'drop'\noptions = { rate = 48000 }\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[tasks]]\nname='a'\ncall='x:y'\nstream='s'\n", "give exactly one of 'size' (samples) and 'seconds'"),
        ("[[tasks]]\nname='a'\ncall='xy'\nstream='s'\nsize=3\n", "'call' must be 'module:function'"),
        ("[[tasks]]\nname='a'\ncall='x:y'\nstream='s'\nsize=3\ncolour=1\n", "unknown key 'colour'"),
        # Issue 12, item 7: each of these started and then crash-looped or waited in silence.
        (SOURCE + "[broker]\nlease_timout = 3\n" + TASK, "[broker]: unknown key 'lease_timout'; did you mean 'lease_timeout'?"),
        (SOURCE + TASK.replace("'drop'", "'dorp'"), "'policy' must be one of 'block', 'drop', got 'dorp'; did you mean 'drop'?"),
        (SOURCE + TASK.replace("seconds = 0.5", "seconds = '0.5'"), "'seconds' must be a number, got '0.5' (a str)"),
        (SOURCE + TASK.replace("seconds = 0.5", "seconds = 0"), "'seconds' must be a finite number > 0, got 0"),
        (SOURCE + TASK.replace("{ rate = 48000 }", "{ rat = 48000 }"), "has no option 'rat'; did you mean 'rate'?"),
        (SOURCE + TASK.replace("stream = 'mic'", "stream = 'mci'"), "no [[sources]] provides (sources: 'mic'); did you mean 'mic'?"),
        (SOURCE + "max_chunk_bytes = 65536\n" + TASK, "asks for chunks of 192000 bytes, larger than its max_chunk_bytes (65536)"),
        (SOURCE.replace("rate = 48000", "rate = 48000\nfreq = [1.0]") + TASK, "has no option 'freq'; did you mean 'freqs'?"),
        (SOURCE.replace("rate = 48000", "rate = '48k'") + TASK, "a synthetic source's option 'rate' must be a number, got '48k' (a str)"),
        (SOURCE.replace("channels = 2", "channels = 2.5") + TASK, "a synthetic source's option 'channels' must be an integer, got 2.5"),
        ("[[tasks]]\nname='a'\ncall='no_such_module_x:y'\nstream='s'\nsize=3\n", "No module named 'no_such_module_x'"),
        ("[broker\n", "not valid TOML"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path, text, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    result = subprocess.run([sys.executable, "-m", "slabcast", "up", str(cfg)], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr


def test_status_json_reports_uptime_and_pool(broker, stream_name):
    with slabcast.Publisher(stream_name, address=broker.address, nslabs=4) as pub:
        pub.write(__import__("numpy").zeros(5, dtype="float32"))
        status = json.loads(subprocess.run([sys.executable, "-m", "slabcast", "status", "--json", "--address",
                                            broker.address], capture_output=True, text=True, timeout=30).stdout)  # fmt: skip
    assert status["pid"] == broker.pid
    assert status["uptime"] > 0
    assert status["streams"][0]["slabs"] == 4


# Issue 19, item 8: `up` hands the broker the values it checked, typed; the broker never guesses again.


def test_up_runs_the_source_options_it_checked_unchanged(tmp_path):
    # Once re-stringified: loop = false arrived as the string "False" (true: the file looped forever) and the
    # stream name "1e3" as the number 1000.0.
    soundfile = pytest.importorskip("soundfile")
    import numpy as np

    audio = (np.arange(24_000 * 2) % 3000).astype(np.int16).reshape(-1, 2)
    soundfile.write(str(tmp_path / "a.wav"), audio, 48000, subtype="PCM_16")
    tally = tmp_path / "tally.txt"
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        f"[[sources]]\nkind = 'file'\nname = '1e3'\npath = '{tmp_path}/a.wav'\nloop = false\n"
        "[[tasks]]\nname = 'rec'\ncall = 'tests.integration.workers:tally'\nstream = '1e3'\nsize = 10000\n"
        f"clip = true\npartial_tail = true\noptions = {{ out = '{tally}' }}\n"
    )
    result = subprocess.run([sys.executable, "-m", "slabcast", "up", str(cfg)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every task finished its stream" in result.stdout
    rows = [tuple(map(int, line.split())) for line in tally.read_text().splitlines()]
    assert sum(n for _, n, _ in rows) == 24_000  # the file once, not lap after lap


def test_source_values_with_commas_and_digits_keep_their_type_on_the_command_line(tmp_path):
    from slabcast.sources import SourceOptionError, parse_source, source_options

    pytest.importorskip("pylsl")
    # docs/lsl.md's predicate example exited 2 (its comma split the value); an ALSA device name has one too.
    spec = "lsl:name=emg,predicate=name='EMG' and starts-with(source_id,'sn'),timeout=0.5"
    assert parse_source(spec).predicate == "(name='EMG' and starts-with(source_id,'sn')) and not(desc/slabcast_outlet)"
    src = parse_source("stdin:name=1234,dtype=int16,channels=2,rate=48000,pace=false,fd=0")
    assert src.info.name == "1234" and src.pace is False and src.info.channels == 2
    assert parse_source("synthetic:name=1e3,freqs=440/880").info.name == "1e3"
    assert source_options("audio", {"device": "hw:1,0"}, text=True)[0] == {"device": "hw:1,0"}
    assert source_options("audio", {"device": "3"}, text=True)[0] == {"device": 3}
    with pytest.raises(SourceOptionError, match=r"'loop' must be true or false, got 'maybe'"):
        parse_source(f"file:path={tmp_path}/x.wav,loop=maybe")
    with pytest.raises(SourceOptionError, match=r"has no option 'chanels'; did you mean 'channels'\?"):
        parse_source("synthetic:rate=48000,chanels=2")
    # The same line as a user types it: the broker starts, its source waiting for the outlet.
    address = f"ipc://{tmp_path}/b.sock"
    with slabcast.BrokerProcess(address, args=("--source", spec)) as broker:
        (source,) = slabcast.broker_status(broker.address)["sources"]
        assert source["name"] == "emg" and source["state"] in ("starting", "waiting")


def test_a_broker_serves_while_a_source_is_still_in_its_first_look(tmp_path, stream_name):
    # liblsl's first resolve once took 11 s in CI, and the broker said it was ready only after it: past
    # BrokerProcess's 10 s. Here the first look lasts 20 s (an LSL predicate nothing matches, timeout=20): the
    # broker serves before it ends, the source said to be starting.
    pytest.importorskip("pylsl")
    spec = f"lsl:name={stream_name},predicate=name='{stream_name}-none',timeout=20"
    with slabcast.BrokerProcess(f"ipc://{tmp_path}/b.sock", args=("--source", spec)) as broker:
        (source,) = slabcast.broker_status(broker.address)["sources"]
        assert source["name"] == stream_name and source["state"] == "starting", source


def test_up_says_why_the_broker_did_not_start(tmp_path):
    # It said "did not start within 10.0 s ... no output" while the broker had printed its reason.
    cfg = tmp_path / "up.toml"
    (tmp_path / "afile").write_text("")
    cfg.write_text(f"[broker]\naddress = 'ipc://{tmp_path}/afile/b.sock'\n" + SOURCE + TASK)  # not a directory
    result = subprocess.run([sys.executable, "-m", "slabcast", "up", str(cfg)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert "no output" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.search(r"the broker exited with code 2 before serving: slabcast broker: .*afile", last), result.stderr


# Issue 19, item 9: tasks are checked where they are declared.


def run_up_in(cwd, cfg, **kw):
    return subprocess.run([sys.executable, "-m", "slabcast", "up", str(cfg)], capture_output=True, text=True,
                          timeout=60, cwd=cwd, **kw)  # fmt: skip


def test_a_task_module_beside_the_config_imports_without_pythonpath(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "my_tasks_19.py").write_text("def count(chunk, label):\n    print(f'[{label}] {len(chunk)}', flush=True)\n")
    cfg = conf / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        "[[sources]]\nkind = 'stdin'\nname = 'bytes'\nframe = 100\n"
        "[[tasks]]\nname = 'count'\ncall = 'my_tasks_19:count'\nstream = 'bytes'\nsize = 100\npartial_tail = true\n"
        "options = { label = 'mine' }\n"
    )
    # From another directory, without PYTHONPATH (`python -m` puts only the working directory on the path).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_up_in(tmp_path, cfg, input="x" * 250, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("[mine]")] == \
        ["[mine] 100", "[mine] 100", "[mine] 50"]  # fmt: skip


@pytest.mark.parametrize(
    ("module", "call", "message"),
    [
        ("import os\nraise RuntimeError('no licence server')\n", "boom_19:f",
         r"cannot import 'boom_19:f': RuntimeError: no licence server \(.*boom_19\.py, line 2\)"),
        ("def f(chunk, out):\n    pass\n", "boom_19:f",
         r"boom_19:f needs option 'out': options = \{ out = \.\.\. \}"),
    ],
)  # fmt: skip
def test_a_task_that_cannot_run_is_refused_in_one_line_before_anything_starts(tmp_path, module, call, message):
    (tmp_path / "boom_19.py").write_text(module)
    cfg = tmp_path / "up.toml"
    cfg.write_text(SOURCE + TASK.replace("slabcast.examples:spectral_peak", call).replace("options = { rate = 48000 }\n", ""))
    result = run_up_in(tmp_path, cfg)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr


@pytest.mark.parametrize("code", [1, 3])  # 3: a reviewer saw a task's own sys.exit(3) taken as "its stream ended"
def test_a_task_failing_again_and_again_is_marked_failed_and_up_exits_1(tmp_path, code):
    crash = "raise ValueError('bad chunk')" if code == 1 else "raise SystemExit(3)"
    (tmp_path / "crash_19.py").write_text(f"def crash(chunk):\n    {crash}\n")
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n" + SOURCE + "[[tasks]]\nname = 'crash'\n"
        "call = 'crash_19:crash'\nstream = 'mic'\nsize = 480\nmax_failures = 3\n"
    )
    result = run_up_in(tmp_path, cfg)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"task crash#0 exited with code {code}; restart 2 in 1 s" in result.stdout
    assert (f"task crash#0 failed: exited with code {code}, 3 times in a row; not restarted (max_failures = 3)"
            in result.stdout)  # fmt: skip
    assert "every task is done; failed: crash" in result.stdout
    # What it did not process: after it gave up too (a newcomer: the summary counted only up to its last restart).
    assert re.search(r"task crash#0 did not process .*the samples from (its stream's start|stream index \d+) on \(it "
                     r"was no longer restarted\), across its 2 restarts", result.stdout), result.stdout


def test_a_pip_user_gets_the_example_config_from_up_example(tmp_path):
    result = subprocess.run([sys.executable, "-m", "slabcast", "up", "--example"], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == CONFIG.read_text()  # the same file as the source checkout's broker/slabcast.toml
    (tmp_path / "up.toml").write_text(result.stdout)
    from slabcast.cli.up import load_config

    assert [t.name for t in load_config(str(tmp_path / "up.toml")).tasks] == ["spl", "recorder", "model"]
    bare = subprocess.run([sys.executable, "-m", "slabcast", "up"], capture_output=True, text=True, timeout=30)
    assert bare.returncode == 2 and "slabcast up --example > slabcast.toml" in bare.stderr


def test_a_worker_whose_up_was_killed_says_so_in_one_line_not_a_traceback(tmp_path):
    # A newcomer: after `kill -9` of `up` (its broker goes with it), a worker drained its backlog, then died with a
    # BrokerGoneError traceback, which reads as a bug of the task.
    tally = tmp_path / "tally.txt"
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 8000\nchannels = 1\nframe = 80\n"
        "[[tasks]]\nname = 'rec'\ncall = 'tests.integration.workers:tally'\nstream = 'mic'\nsize = 800\n"
        f"options = {{ out = '{tally}' }}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "slabcast", "up", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        lines = Lines(proc.stdout)
        lines.expect(r"task rec#0 started, pid (\d+)")
        lines.expect(r"^\[tally\] \d+ 800$", timeout=30)
        proc.kill()  # up alone: its broker follows it; the worker is left
        err = proc.stderr.read()  # (until the last writer, the worker, has exited)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert re.search(r"task rec#0: the broker (shut down|.* went away).*, having processed its stream up to index \d+",
                     err), err  # fmt: skip
    assert "Traceback" not in err, err


def test_a_broker_killed_under_up_has_each_task_said_with_its_index_and_no_traceback(tmp_path):
    # A newcomer: `kill -9` of the broker under `up` left each worker noticing the broker's death while up stopped
    # it: its stop, raised from the signal handler wherever the worker was, cut a multipart message in half
    # (then "Invalid event message format" from close()) or an import (NameError); some runs said nothing of
    # where the tasks had got to. The stop is now a flag the worker reads between chunks and up says each task.
    cfg = tmp_path / "up.toml"
    tasks = "".join(
        f"[[tasks]]\nname = 'rec{k}'\ncall = 'tests.integration.workers:tally'\nstream = 'mic'\nsize = 800\n"
        f"options = {{ out = '{tmp_path}/tally{k}.txt' }}\n"
        for k in range(3)
    )
    cfg.write_text(f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
                   "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 8000\nchannels = 1\nframe = 80\n" + tasks)
    with (tmp_path / "err.txt").open("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "slabcast", "up", str(cfg)], stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)  # fmt: skip
        try:
            lines = Lines(proc.stdout)
            broker_pid = int(lines.expect(r"broker (\d+) serving")[1])
            while not all((tmp_path / f"tally{k}.txt").exists() for k in range(3)):  # (each has had a chunk)
                lines.expect(r"^\[tally\] \d+ 800$", timeout=30)
            os.kill(broker_pid, signal.SIGKILL)
            lines.expect(r"the broker exited with code -9$", timeout=30)
            lines.expect(r"^stopping$", timeout=30)
            lines.expect(r"removed the shared memory the broker left: slabcast\.", timeout=30)
            said = {m[1]: int(m[2]) for m in (
                lines.expect(r"task (rec\d)#0 processed its stream up to index (\d+) when the broker died", timeout=30)
                for _ in range(3))}  # fmt: skip
            assert proc.wait(30) == 1
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()
        err.seek(0)
        text = err.read()
    assert set(said) == {"rec0", "rec1", "rec2"}
    for k in range(3):  # where each had got to: the end of the last chunk its callback returned from
        start, n, _ = map(int, (tmp_path / f"tally{k}.txt").read_text().splitlines()[-1].split())
        assert said[f"rec{k}"] == start + n, said
    assert "Traceback" not in text, text


def test_a_worker_stopped_by_hand_with_sigusr2_is_restarted_as_asked_not_as_a_failure(tmp_path):
    # An audio newcomer found no way to restart one worker: SIGTERM is dropped (it is up's), and SIGUSR2 was
    # reported as a crash ("exited with code 143"), counting towards max_failures.
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f"[broker]\naddress = 'ipc://{tmp_path}/b.sock'\n"
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 8000\nchannels = 1\nframe = 80\n"
        "[[tasks]]\nname = 'rec'\ncall = 'tests.integration.workers:tally'\nstream = 'mic'\nsize = 800\n"
        f"max_failures = 1\noptions = {{ out = '{tmp_path}/tally.txt' }}\n"
    )
    with running_up(cfg) as (proc, lines):
        for restart in (1, 2):  # (max_failures = 1: one failure would end the task)
            pid = int(lines.expect(r"task rec#0 started, pid (\d+)")[1])
            lines.expect(r"^\[tally\] \d+ 800$", timeout=30)
            os.kill(pid, signal.SIGUSR2)
            lines.expect(rf"task rec#0 was stopped by SIGUSR2; restart {restart} in 0.5 s")
        lines.expect(r"task rec#0 started, pid (\d+)")
        lines.expect(r"^\[tally\] \d+ 800$", timeout=30)
        proc.send_signal(signal.SIGINT)
        lines.expect(r"stopped \(broker exit code 0, 2 restarts\)", timeout=30)
        assert proc.wait(30) == 0


def test_a_worker_is_never_stopped_inside_its_clients_recv(broker, stream_name, tmp_path):
    # A newcomer's kill -9 of the broker under up: the worker's stop, raised from the signal handler wherever it
    # was, cut the client's own reading in half (then "Invalid event message format" from close()). The stop is a
    # flag now: here the client's recv spends 0.3 s inside itself after each chunk, and the stop comes then.
    out = tmp_path / "tally.txt"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from tests.integration.workers import "
                             "task_in_a_slow_client as f; f(*sys.argv[1:])", broker.address, stream_name, str(out)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        with slabcast.Publisher(stream_name, "int16", rate=8000.0, address=broker.address) as pub:
            lines = Lines(proc.stdout)
            deadline = time.monotonic() + 20
            while not slabcast.broker_status(broker.address)["streams"][0]["subscribers"]:
                assert time.monotonic() < deadline, "the worker never subscribed"
                time.sleep(0.02)  # (polling the broker's status: the subscription is the broker's to tell)
            pub.write(np.arange(800, dtype=np.int16))
            lines.expect(r"^\[tally\] 0 80$", timeout=20)  # (its first recv returned; the next is inside 0.3 s)
            proc.send_signal(signal.SIGUSR2)
            assert proc.wait(20) == 143  # (_STOPPED: stopped, not failed)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert set((tmp_path / "tally.txt.close").read_text().split()) == {"clean"}  # (closed by with, then __del__)
    assert out.read_text().splitlines()[0] == "0 80 0"


def test_a_task_imported_at_start_runs_programs_with_no_signal_blocked_and_a_stop_meanwhile_waits_for_it(
        broker, stream_name, tmp_path):  # fmt: skip
    # A reviewer: a worker that unblocked its signals only after the task's import gave the programs the import
    # started SIGINT and SIGTERM blocked (a helper outlived `systemctl stop` until SIGKILL). A stop that comes
    # during the import is acted on once the import is done: exit 143, no traceback of the import.
    (tmp_path / "slowimport.py").write_text(textwrap.dedent(f"""
        import pathlib, subprocess, time
        blocked = subprocess.run(["grep", "SigBlk", "/proc/self/status"], capture_output=True, text=True).stdout
        pathlib.Path({str(tmp_path / "blocked.txt")!r}).write_text(blocked)
        pathlib.Path({str(tmp_path / "importing")!r}).touch()
        time.sleep(1.0)  # (the stop comes meanwhile)

        def task(chunk):
            pass
    """))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from tests.integration.workers import "
                             "task_main_as_up_starts_it as f; f(*sys.argv[1:])", broker.address, stream_name,
                             "slowimport:task", str(tmp_path)], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "importing").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the task's module was never imported"
            time.sleep(0.02)  # (the file is the import's own signal that it runs)
        proc.send_signal(signal.SIGUSR2)
        assert proc.wait(20) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err = proc.stderr.read()
        proc.stderr.close()
    assert "Traceback" not in err, err
    assert re.fullmatch(r"SigBlk:\s+0+\n", (tmp_path / "blocked.txt").read_text()), (tmp_path / "blocked.txt").read_text()
