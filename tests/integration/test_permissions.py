"""Sharing a broker with a group, and refusing what another user made (issue 19, items 15 and 16)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A short directory under /tmp that every uid may enter (pytest's tmp_path is 0700, and long)."""
    path = Path(tempfile.mkdtemp(prefix="sc-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env_without_runtime_dir(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "SLABCAST_ADDRESS")}
    env["TMPDIR"] = str(tmp)
    return env


@pytest.mark.parametrize("command", [["broker"], ["status"]])
def test_a_default_directory_made_by_another_user_is_refused(shared_tmp, command):
    if os.getuid() != 0:
        pytest.skip("giving a directory to another uid needs root")
    # Without XDG_RUNTIME_DIR the address lives in <tmp>/slabcast-<uid>: another user who made it first,
    # mode 0777, could hold the address (issue 19, item 16).
    theirs = shared_tmp / f"slabcast-{os.getuid()}"
    theirs.mkdir()
    theirs.chmod(0o777)
    os.chown(theirs, 4242, 4242)
    proc = subprocess.run([sys.executable, "-m", "slabcast", *command], env=_env_without_runtime_dir(shared_tmp),
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode != 0
    assert f"refusing the broker directory {theirs} (owner uid 4242, mode 0777" in proc.stderr, proc.stderr
    assert "belongs to another user" in proc.stderr
    assert not (theirs / "slabcast").exists()  # nothing made in it
