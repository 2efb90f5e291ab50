"""`slabcast up`'s configuration, read without starting anything: how it sizes the pool.

Moved from tests/integration/test_up.py, whose other tests run `slabcast up`.
"""

from __future__ import annotations

import re

import numpy as np
import pytest


def test_the_pool_is_sized_from_the_largest_chunk_and_the_history(tmp_path):
    from slabcast.cli.up_config import load_config
    from slabcast.core.geometry import RING_BYTES

    cfg = tmp_path / "h.toml"
    cfg.write_text(
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 48000\nchannels = 2\nhistory = 30.0\n"
        "[[tasks]]\nname = 'rec'\ncall = 'slabcast.examples:wav_file'\nstream = 'mic'\nseconds = 10.0\nclip = true\n"
        "options = { out = 'takes' }\n"
    )
    config = load_config(str(cfg))
    (source,) = config.sources
    opts = source["options"]
    chunk = 480000 * 8  # 10 s of 48 kHz stereo float32
    # Under the 64 MiB a default pool grows to: no max_chunk_bytes, the slabs keep 2 MiB for frames.
    assert "max_chunk_bytes" not in opts and "slab_bytes" not in opts
    # 30 s of stream (11.52 MB) over 2 MiB of frames per slab: 6 slabs, plus 3.
    assert int(opts["nslabs"]) == 9
    # /dev/shm: each slab's frames and the 10 s chunk it may carry, the header and the ring of descriptors (4 MiB and a page:
    # an operator's up said a config of three streams fit /dev/shm when it lacked 11 MiB).
    assert config.shm_bytes == 9 * ((2 << 20) + -(-chunk // 4096) * 4096) + 4096 + RING_BYTES  # (carried: pages)

    huge = tmp_path / "huge.toml"  # 400 s of 48 kHz stereo float32 (153.6 MB) is past that
    huge.write_text(cfg.read_text().replace("seconds = 10.0", "seconds = 400.0"))
    opts = load_config(str(huge)).sources[0]["options"]
    assert int(opts["max_chunk_bytes"]) == 400 * 48000 * 8
    assert int(opts["slab_bytes"]) == 400 * 48000 * 8 + (2 << 20)

    given = tmp_path / "given.toml"  # max_chunk_bytes given, slab_bytes not: frames get as much room
    given.write_text(cfg.read_text().replace("history = 30.0\n", "max_chunk_bytes = 8388608\n"))
    opts = load_config(str(given)).sources[0]["options"]
    assert int(opts["max_chunk_bytes"]) == 8 << 20 and int(opts["slab_bytes"]) == 16 << 20


def test_relative_file_names_in_a_config_are_read_beside_it_whatever_the_working_directory(tmp_path, monkeypatch):
    # Task modules were found beside the config, but `path = "take.wav"` followed the working directory:
    # `cd / && slabcast up /x/file.toml` said "no audio file at 'take.wav'".
    soundfile = __import__("pytest").importorskip("soundfile")
    import numpy as np

    from slabcast.cli.up_config import load_config

    conf = tmp_path / "conf"
    conf.mkdir()
    soundfile.write(str(conf / "take.wav"), np.zeros(800, np.int16), 8000)
    (conf / "file.toml").write_text(
        "[[sources]]\nkind = 'file'\nname = 'take'\npath = 'take.wav'\n"
        "[[tasks]]\nname = 'rec'\ncall = 'slabcast.examples:wav_file'\nstream = 'take'\nsize = 100\n"
        "options = { out = 'takes' }\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("conf/file.toml")
    assert config.sources[0]["options"]["path"] == str(conf / "take.wav")
    assert config.tasks[0].options["out"] == str(conf / "takes")


def test_a_task_writing_files_must_say_where(tmp_path):
    # slabcast.examples:wav_file without `out` wrote into whatever directory up was started from.
    import pytest

    from slabcast.cli.up_config import ConfigError, load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\n"
        "[[tasks]]\nname = 'rec'\ncall = 'slabcast.examples:wav_file'\nstream = 'mic'\nsize = 100\n"
    )
    with pytest.raises(ConfigError, match="out"):
        load_config(str(cfg))


def test_the_shipped_configs_load(tmp_path, monkeypatch):
    # docs/up.md runs broker/stdin.toml and broker/file.toml: they must exist and check.
    import os
    import pathlib
    import shutil
    import sys

    import numpy as np
    import pytest

    soundfile = pytest.importorskip("soundfile")
    from slabcast.cli.up_config import load_config

    root = pathlib.Path(__file__).resolve().parents[2] / "broker"
    devnull = open(os.devnull)  # noqa: SIM115  (the stdin source reads the process's standard input)
    monkeypatch.setattr(sys, "stdin", devnull)
    stdin = load_config(str(root / "stdin.toml"))
    assert [s["kind"] for s in stdin.sources] == ["stdin"]
    assert stdin.tasks[1].options["out"] == str(root / "takes")
    shutil.copy(root / "file.toml", tmp_path / "file.toml")
    soundfile.write(str(tmp_path / "speech.wav"), np.zeros(4800, np.int16), 48000)
    file = load_config(str(tmp_path / "file.toml"))
    assert file.sources[0]["options"]["path"] == str(tmp_path / "speech.wav")
    devnull.close()


def test_history_of_an_lsl_source_goes_to_the_broker_which_sizes_the_pool_when_the_outlet_gives_the_rate(tmp_path):
    # Its rate is the outlet's, unknown until the source connects: `history` was refused here ("needs a stream
    # with a rate"); now it rides with the pool options (test_lsl.py checks the sizing).
    __import__("pytest").importorskip("pylsl")
    from slabcast.cli.up_config import ConfigError, load_config

    cfg = tmp_path / "lsl.toml"
    cfg.write_text(
        "[[sources]]\nkind = 'lsl'\nname = 'eeg'\nstream = 'EEG'\nhistory = 10\n"
        "[[tasks]]\nname = 'rec'\ncall = 'slabcast.examples:wav_file'\nstream = 'eeg'\nsize = 500\n"
        "options = { out = 'takes' }\n"
    )
    (source,) = load_config(str(cfg)).sources
    assert source["options"]["history"] == 10 and "nslabs" not in source["options"]
    cfg.write_text(cfg.read_text().replace("history = 10", "history = -1"))
    with __import__("pytest").raises(ConfigError, match=r"'history' must be a finite number > 0, got -1"):
        load_config(str(cfg))
    cfg.write_text(cfg.read_text().replace("history = -1", "history = inf"))  # (a newcomer: "a number > 0, got inf")
    with __import__("pytest").raises(ConfigError, match=r"'history' must be a finite number > 0, got inf"):
        load_config(str(cfg))


@pytest.mark.parametrize(("options", "said"), [
    ("rate = 0", "rate must be a positive finite number of samples per second, got 0"),
    ("rate = -1", "got -1"), ("rate = inf", "got inf"), ("rate = nan", "got nan"),
    ("channels = 0", "channels must be a positive integer, got 0"), ("frame = 0", "frame must be a positive integer"),
])  # fmt: skip
def test_a_source_option_out_of_range_is_refused_naming_the_file_and_table(tmp_path, options, said):
    # (a newcomer: rate = 0 started the broker, which refused the stream in its log while the task waited forever;
    # nan was "cannot convert float NaN to integer")
    from slabcast.cli.up_config import ConfigError, load_config
    from slabcast.sources import parse_source

    cfg = tmp_path / "r.toml"
    cfg.write_text(f"[[sources]]\nkind = 'synthetic'\nname = 'mic'\n{options}\n[[tasks]]\nname = 'spl'\n"
                   "call = 'slabcast.examples:wav_file'\nstream = 'mic'\nsize = 100\noptions = { out = 'x' }\n")  # fmt: skip
    with pytest.raises(ConfigError, match=rf"r\.toml: \[\[sources\]\] #1: .*{re.escape(said)}"):
        load_config(str(cfg))
    spec = "synthetic:name=mic," + options.replace(" ", "")
    with pytest.raises(ValueError, match=f"{re.escape(said)}.*in {re.escape(repr(spec))}"):
        parse_source(spec)


@pytest.mark.parametrize("frame", [0, -1])
def test_a_file_source_of_frames_of_no_samples_is_refused(tmp_path, frame):
    # A newcomer: `frame = 0` started a file source that read nothing, flat out (the broker at 98 % of a core),
    # forever, its status `running, no sample yet`; synthetic and stdin refused it.
    soundfile = pytest.importorskip("soundfile")
    from slabcast.cli.up_config import ConfigError, load_config
    from slabcast.sources import parse_source

    wav = tmp_path / "a.wav"
    soundfile.write(str(wav), np.zeros((480, 2), np.int16), 48000)
    cfg = tmp_path / "f.toml"
    cfg.write_text(f"[[sources]]\nkind = 'file'\nname = 'mic'\npath = '{wav}'\nframe = {frame}\n[[tasks]]\n"
                   "name = 'w'\ncall = 'slabcast.examples:wav_file'\nstream = 'mic'\nsize = 100\n"
                   "options = { out = 'x' }\n")  # fmt: skip
    with pytest.raises(ConfigError, match=rf"f\.toml: \[\[sources\]\] #1: .*frame must be a positive integer, got {frame}"):
        load_config(str(cfg))
    with pytest.raises(ValueError, match=f"frame must be a positive integer, got {frame}"):
        parse_source(f"file:path={wav},frame={frame}")


@pytest.mark.parametrize(
    ("call", "options", "said"),
    [
        ("nochunk", "{}", r"must take the chunk as its first argument \(def f\(chunk, \.\.\.\)\), its signature is \(\)"),
        ("gain", "{ rate = '48000' }", r"option 'rate' must be a number, as its default 48000 is, got '48000' \(a str\)"),
        ("gain", "{ loud = 1 }", r"option 'loud' must be true or false, as its default False is, got 1 \(a int\)"),
        ("gain", "{ label = 3 }", r"option 'label' must be a string, as its default 'x' is, got 3 \(a int\)"),
        # Annotated (a newcomer: annotations written as types, without `from __future__ import annotations`, were
        # never checked, and `log = 5` opened file descriptor 5); the same under the future import.
        *[(f"{module}typed", options, said) for module in ("", "future_") for options, said in [
            ("{ fail_at = '3' }", r"option 'fail_at' must be an integer, got '3' \(a str\)"),
            ("{ fail_at = 3, log = 5 }", r"option 'log' must be a string, got 5 \(a int\)"),
            ("{ fail_at = 3, ratio = 'x' }", r"option 'ratio' must be a number, got 'x' \(a str\)"),
            ("{ fail_at = 3, on = 1 }", r"option 'on' must be true or false, got 1"),
            # (an unknown key first: the misspelling of the one missing, which alone was said before)
            ("{ failat = 3 }", r"has no option 'failat'; did you mean 'fail_at'\?"),
        ]],
    ],
)  # fmt: skip
def test_a_task_callable_that_cannot_take_the_chunk_or_an_option_of_the_wrong_kind_is_refused(tmp_path, monkeypatch,
                                                                                               call, options, said):  # fmt: skip
    # A newcomer: each was taken, then every worker crash-looped on its first chunk (TypeError).
    from slabcast.cli.up_config import ConfigError, load_config

    typed = "def {}typed(chunk, fail_at: int, log: str = 'x', ratio: float | None = None, on: bool = False):\n    pass\n"
    (tmp_path / "mytasks.py").write_text(
        "def nochunk():\n    pass\n\n\ndef gain(chunk, rate=48000, loud=False, label='x'):\n    pass\n\n\n"
        + typed.format("") + "\n\nfrom mytasks_future import future_typed  # noqa\n"
    )
    (tmp_path / "mytasks_future.py").write_text("from __future__ import annotations\n\n\n" + typed.format("future_"))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\n"
        f"[[tasks]]\nname = 't'\ncall = 'mytasks:{call}'\nstream = 'mic'\nsize = 100\noptions = {options}\n"
    )
    with pytest.raises(ConfigError, match=said):
        load_config(str(cfg))


def test_every_table_s_mistake_is_told_in_one_run(tmp_path):
    # A lab newcomer: a config with three mistakes took three runs, one message each.
    from slabcast.cli.up_config import ConfigError, load_config

    cfg = tmp_path / "three.toml"
    cfg.write_text(
        "[broker]\nlease_timout = 5\n"
        "[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 48000\nchannels = 2\n"
        "[[tasks]]\nname = 'level'\ncall = 'slabcast.examples:spl'\nstream = 'mic'\nseconds = 0\n"
        "[[tasks]]\nname = 'rec'\ncall = 'slabcast.examples:wav_file'\nstream = 'mick'\nseconds = 1.0\n"
        "options = { out = 'takes' }\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(str(cfg))
    said = str(raised.value)
    assert said.startswith(f"{cfg}: 3 problems:\n"), said
    assert "'lease_timout'" in said and "did you mean 'lease_timeout'?" in said, said
    assert "\n  [[tasks]] #1 (level): 'seconds' must be a finite number > 0, got 0\n" in said, said
    assert "seconds" in said and "reads stream 'mick', which no [[sources]] provides" in said, said
    assert "did you mean 'mic'?" in said, said
    # One mistake: its message alone, as before.
    cfg.write_text(cfg.read_text().replace("lease_timout", "lease_timeout").replace("seconds = 0\n", "seconds = 0.5\n")
                   .replace("'mick'", "'mic'"))  # fmt: skip
    assert load_config(str(cfg)).tasks[0].name == "level"


def test_two_tasks_of_one_name_and_a_chunk_no_slab_holds_are_refused_as_the_tasks(tmp_path):
    # A newcomer: two tasks named 'spl' both started as `task spl#0` (after a kill -9, which one restarted?), and
    # seconds = 1e9 said "slab_bytes must be a multiple of 4096 up to 2**30, got 192000002097152": a key they
    # never wrote.
    from slabcast.cli.up_config import ConfigError, load_config

    cfg = tmp_path / "dup.toml"
    task = "[[tasks]]\nname = 'spl'\ncall = 'slabcast.examples:spl'\nstream = 'mic'\nseconds = 0.5\n"
    cfg.write_text("[[sources]]\nkind = 'synthetic'\nname = 'mic'\nrate = 48000\nchannels = 2\n" + task + task)
    with pytest.raises(ConfigError, match=r"\[\[tasks\]\] #1 and #2 are both named 'spl': each task needs a name"):
        load_config(str(cfg))
    cfg.write_text(cfg.read_text().replace("seconds = 0.5", "seconds = 1e9", 1).replace("'spl'", "'big'", 1))
    with pytest.raises(ConfigError, match=r"task 'big' asks for chunks of 384000000000000 bytes; a chunk must fit in "
                                          r"one slab \(up to 2\*\*30 bytes, with room for frames\): at most "
                                          r"1071644672 bytes here \(133955584 samples\)"):
        load_config(str(cfg))
    cfg.write_text(cfg.read_text().replace("seconds = 1e9", "seconds = 2.0"))
    assert [t.name for t in load_config(str(cfg)).tasks] == ["big", "spl"]


def load_task(cfg, call, options):
    """Load a config of one synthetic source 'mic' and one task 't' calling ``call`` with ``options`` (TOML)."""
    from slabcast.cli.up_config import load_config

    cfg.write_text("[[sources]]\nkind = 'synthetic'\nname = 'mic'\n[[tasks]]\nname = 't'\n"
                   f"call = '{call}'\nstream = 'mic'\nsize = 100\noptions = {options}\n")  # fmt: skip
    return load_config(str(cfg))


def test_option_checks_follow_every_kind_an_annotation_allows(tmp_path, monkeypatch):
    # A reviewer: a union with a number refused what its other kinds allow (Union[int, str] given 'abc'); an
    # Optional[int] took 3.5; a positional-only parameter passed the check and failed in every worker.
    from slabcast.cli.up_config import ConfigError

    (tmp_path / "kinds.py").write_text(
        "import typing\n\n\n"
        "def mixed(chunk, x: typing.Union[int, str] = 0, y: 'typing.Optional[float]' = None, z: bool | None = None,\n"
        "          n: typing.Optional[int] = None, many: list[int] | None = None):\n    pass\n\n\n"
        "def posonly(chunk, gain, /):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def load(call, options):
        return load_task(tmp_path / "k.toml", f"kinds:{call}", options)

    load("mixed", "{ x = 'abc', y = 2, z = true, n = 3, many = [1, 2] }")  # every value of a kind it allows
    for options, said in [("{ n = 3.5 }", "option 'n' must be an integer, got 3.5"),
                          ("{ z = 'yes' }", "option 'z' must be true or false, got 'yes'"),
                          ("{ y = 'x' }", "option 'y' must be a number, got 'x'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(said)):
            load("mixed", options)
    with pytest.raises(ConfigError, match=r"takes 'gain' positionally only .*options are passed by name"):
        load("posonly", "{ gain = 2 }")


def test_an_option_outside_its_literal_choices_is_refused_with_the_choices(tmp_path, monkeypatch):
    # A lab newcomer: xdf_file's clock = "lsll" was taken (a string for a string), then every worker died on its
    # first chunk ("clock must be 'wall' or 'lsl'") and restarted, its recording never written.
    from slabcast.cli.up_config import ConfigError

    (tmp_path / "lits.py").write_text(
        "from typing import Literal, Optional\n\n\n"
        "def typed(chunk, mode: Literal['fast', 'exact'] = 'fast', n: Optional[Literal[1, 2]] = None):\n    pass\n"
    )
    (tmp_path / "lits_future.py").write_text(
        "from __future__ import annotations\n\nimport typing\n\n\n"
        "def typed(chunk, mode: typing.Literal['fast', 'exact'] = 'fast', n: Literal[1, 2] | None = None):\n"
        "    pass\n\n\nfrom typing import Literal  # noqa: E402\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def load(call, options):
        return load_task(tmp_path / "l.toml", call, options)

    for module in ("lits", "lits_future"):
        load(f"{module}:typed", "{ mode = 'exact', n = 2 }")
        with pytest.raises(ConfigError, match=re.escape("option 'mode' must be one of 'fast', 'exact', got 'exakt'; "
                                                        "did you mean 'exact'?")):  # fmt: skip
            load(f"{module}:typed", "{ mode = 'exakt' }")
        with pytest.raises(ConfigError, match=re.escape("option 'n' must be one of 1, 2, None, got 3")):
            load(f"{module}:typed", "{ n = 3 }")
        with pytest.raises(ConfigError, match=re.escape("option 'n' must be one of 1, 2, None, got True")):
            load(f"{module}:typed", "{ n = true }")
    with pytest.raises(ConfigError, match=re.escape("xdf_file's option 'clock' must be one of 'wall', 'lsl', got "
                                                    "'lsll'; did you mean 'lsl'?")):  # fmt: skip
        load("slabcast.examples:xdf_file", "{ out = 'r.xdf', clock = 'lsll' }")
    assert load("slabcast.examples:xdf_file", "{ out = 'r.xdf', clock = 'lsl' }").tasks[0].name == "t"


def test_a_failed_source_is_said_once_and_kept_for_the_exit_code():
    # An operator: a source refused by the broker (no room in /dev/shm) left its tasks waiting, said "its stream
    # never appeared" at the stop, and up exited 0 under a supervisor.
    from slabcast.cli.up import _check_sources

    said: list[str] = []
    failed: dict[str, str] = {}
    status = {"sources": [{"name": "mic", "state": "running", "error": None},
                          {"name": "ramp", "state": "failed", "error": "ShmFullError: /dev/shm has no room"}]}  # fmt: skip
    _check_sources(status, failed, said.append)
    _check_sources(status, failed, said.append)
    assert failed == {"ramp": "ShmFullError: /dev/shm has no room"}
    assert said == ["source 'ramp' failed (ShmFullError: /dev/shm has no room); the tasks on its stream get nothing "
                    "from it"]  # fmt: skip
