"""What a pip user gets: the sdist holds the whole project and says MIT; slabcast says it needs Linux."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_importing_slabcast_elsewhere_than_linux_says_linux_is_required():
    # OFD locks, posix_fallocate and /dev/shm: elsewhere the failure would come later and say less.
    code = "import sys; sys.platform = 'darwin'; import slabcast"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: slabcast runs on Linux only"), result.stderr
    assert "'darwin'" in last


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_the_sdist_holds_the_license_docs_tests_broker_and_c_client(tmp_path):
    # Built as `python -m build --sdist` builds it: in an isolated environment with the declared setuptools.
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (sdist,) = tmp_path.glob("slabcast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
        license_text = tar.extractfile(f"{top}/LICENSE").read().decode()
    for path in (
        "LICENSE", "README.md", "docs/protocol.md", "docs/reliability.md", "tests/conftest.py",
        "tests/integration/test_aio.py", "tests/plugin_project/test_pipeline.py", "broker/slabcast-broker.service",
        "broker/slabcast.toml", "clients/c/slabcast.h", "clients/c/slabcast.c", "clients/c/Makefile",
        "benchmarks/run_all.py", "src/slabcast/__init__.py", "setup.py", "src/slabcast/core/_hot.c",
        "src/slabcast/core/_hot.pyi",
    ):  # fmt: skip
        assert path in names, f"{path} is not in the sdist"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "License-Expression: MIT" in pkg_info.splitlines()
    assert "License-File: LICENSE" in pkg_info.splitlines()
    assert "Classifier: Operating System :: POSIX :: Linux" in pkg_info.splitlines()
    assert license_text.startswith("MIT License") and "the slabcast developers" in license_text


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_without_a_c_compiler_the_wheel_builds_without_the_compiled_module(tmp_path):
    # core/_hot.c is optional (setup.py): a machine with no compiler still installs slabcast, which then runs the
    # same steps in Python and ctypes (core/ring.py).
    # (`build` with neither --sdist nor --wheel builds the wheel from the sdist, in a clean tree: a build/ of the
    # source tree could hold a compiled module that setuptools would take as up to date, never calling CC.)
    env = {**os.environ, "CC": "/bin/false"}
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = tmp_path.glob("slabcast-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    assert "slabcast/core/ring.py" in names and "slabcast/core/_hot.pyi" in names
    assert not [n for n in names if n.startswith("slabcast/core/_hot") and n.endswith(".so")], names
