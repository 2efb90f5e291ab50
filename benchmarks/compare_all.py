"""Run the issue-7 comparison benchmarks: any subset of fanout, latency, small, soak, emit.

    .venv/bin/python benchmarks/compare_all.py                     # fanout latency small (not soak, not emit)
    .venv/bin/python benchmarks/compare_all.py fanout --quick
    .venv/bin/python benchmarks/compare_all.py soak --minutes 10
    .venv/bin/python benchmarks/compare_all.py emit                # benchmarks/bench_emit.py (BufferEmit vs ocycle)

Each scenario prints its tables and writes its JSON to benchmarks/results/.
Options not understood here are an error; ``--quick`` shrinks every scenario
(soak: 1 minute).  ``main(argv)`` is the entry point for ``slabcast bench``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

SCENARIOS = ("fanout", "latency", "small", "soak", "emit")
DEFAULT = ("fanout", "latency", "small")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)} (default: {' '.join(DEFAULT)})"
    )
    ap.add_argument("--quick", action="store_true", help="smaller, fewer trials: a smoke test, not for quoting")
    ap.add_argument("--trials", type=int, default=None, help="trials per configuration (fanout, latency, small)")
    ap.add_argument("--minutes", type=float, default=None, help="soak duration (default 10, --quick 1)")
    a = ap.parse_args(argv)
    bad = [s for s in a.scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario {bad[0]!r}; choose from {', '.join(SCENARIOS)}")
    chosen = list(dict.fromkeys(a.scenarios or DEFAULT))
    m = C.machine_info()
    print(
        f"machine: {m['cpu_model']}, {m['cores']} cores, {m['mem_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, "
        f"pyzmq {m['pyzmq']} (libzmq {m['libzmq']}), slabcast {m['slabcast']} at {m['git_head']}; "
        f"load average {m['loadavg'][0]:.2f}",
        flush=True,
    )
    t0 = time.monotonic()
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        extra: list[str] = []
        if name == "fanout":
            import compare_fanout as mod

            extra = (["--quick"] if a.quick else []) + (["--trials", str(a.trials)] if a.trials else [])
        elif name == "latency":
            import compare_latency as mod  # type: ignore[no-redef]

            extra = (["--quick"] if a.quick else []) + (["--trials", str(a.trials)] if a.trials else [])
        elif name == "small":
            import small_frames as mod  # type: ignore[no-redef]

            extra = (["--quick"] if a.quick else []) + (["--trials", str(a.trials)] if a.trials else [])
        elif name == "soak":
            import soak as mod  # type: ignore[no-redef]

            extra = ["--minutes", str(a.minutes if a.minutes is not None else (1.0 if a.quick else 10.0))]
        else:
            import bench_emit as mod  # type: ignore[no-redef]

            extra = (
                ["--trials", "2", "--scale", "0.25"] if a.quick else (["--trials", str(a.trials)] if a.trials else [])
            )
        code = mod.main(extra)
        if code:
            print(f"{name} exited with {code}", file=sys.stderr)
            return code
    print(f"\nall done in {time.monotonic() - t0:.0f} s; JSON in {C.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
