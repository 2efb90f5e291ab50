"""``slabcast view``: serve the live browser view (work in progress)."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the command's options."""
    p.add_argument("--address", default=None)


def run(args: argparse.Namespace) -> int:
    """Run the command; return the exit code."""
    raise NotImplementedError("slabcast view is not built yet")
