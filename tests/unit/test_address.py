"""The default address directory in the temp dir must be this user's alone (issue 19, item 16)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import slabcast
from slabcast.wire.address import check_private_dir, default_address


@pytest.fixture
def no_runtime_dir(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("SLABCAST_ADDRESS", raising=False)
    tmp = tempfile.mkdtemp(prefix="sc-")  # short: a socket path holds 107 bytes
    monkeypatch.setattr("tempfile.tempdir", tmp)
    yield Path(tmp) / f"slabcast-{os.getuid()}"
    shutil.rmtree(tmp)


def test_a_private_directory_is_accepted_and_made_private(no_runtime_dir):
    assert default_address() == f"ipc://{no_runtime_dir}/slabcast/broker.sock"
    assert no_runtime_dir.stat().st_mode & 0o777 == 0o700
    check_private_dir(str(no_runtime_dir))


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_directory_others_can_write_is_refused(no_runtime_dir, mode):
    no_runtime_dir.mkdir()
    no_runtime_dir.chmod(mode)
    with pytest.raises(slabcast.AccessDeniedError, match=rf"{no_runtime_dir} \(owner uid {os.getuid()}, "
                       rf"mode {mode:04o}.*can be written by other users") as exc:  # fmt: skip
        default_address()
    assert isinstance(exc.value, PermissionError)


def test_a_directory_of_another_user_is_refused(no_runtime_dir):
    if os.getuid() != 0:
        pytest.skip("giving a directory to another uid needs root")
    no_runtime_dir.mkdir(mode=0o700)
    os.chown(no_runtime_dir, 4242, 4242)
    with pytest.raises(slabcast.AccessDeniedError, match=r"owner uid 4242, mode 0700.*belongs to another user"):
        default_address()


def test_a_symlink_or_a_file_is_refused(no_runtime_dir):
    (no_runtime_dir.parent / "elsewhere").mkdir(mode=0o700)
    no_runtime_dir.symlink_to(no_runtime_dir.parent / "elsewhere")
    with pytest.raises(slabcast.AccessDeniedError, match="is not a directory"):
        default_address()


def test_its_slabcast_directory_is_checked_too(no_runtime_dir):
    (no_runtime_dir / "slabcast").mkdir(parents=True)
    no_runtime_dir.chmod(0o700)
    (no_runtime_dir / "slabcast").chmod(0o777)
    with pytest.raises(slabcast.AccessDeniedError, match=r"slabcast-\d+/slabcast .*can be written"):
        default_address()


def test_xdg_runtime_dir_is_trusted(tmp_path, monkeypatch):
    monkeypatch.delenv("SLABCAST_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_address() == f"ipc://{tmp_path}/slabcast/broker.sock"
