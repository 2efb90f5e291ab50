"""Display decimation: slabcast's numpy min/max envelope against tsdownsample's MinMax, 64 channels x 2048 Hz x 10 s
to 1200 pixels (issue 15).  Prints the median of repeated runs of each and their ratio; keep the faster as default.

    .venv/bin/python benchmarks/display.py [--repeat 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from slabcast.client.window import envelope, envelope_tsdownsample


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    data = np.random.default_rng(0).standard_normal((64, 2048 * 10)).astype(np.float32)
    times = np.arange(data.shape[1]) / 2048.0
    results = {}
    for name, fn in (("numpy reduceat", envelope), ("tsdownsample MinMax", envelope_tsdownsample)):
        fn(data, times, 1200)  # warm up
        runs = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            mins, maxs, _ = fn(data, times, 1200)
            runs.append(time.perf_counter() - t)
        results[name] = float(np.median(runs)) * 1e3
        # Every peak survives either way: the extremes of the whole window are in the envelope.
        assert np.array_equal(mins.min(axis=1), data.min(axis=1))
        assert np.array_equal(maxs.max(axis=1), data.max(axis=1))
        print(f"{name:22s} {results[name]:7.2f} ms  ({mins.shape[1]} columns)")
    a, b = results["numpy reduceat"], results["tsdownsample MinMax"]
    print(f"tsdownsample / numpy = {b / a:.2f}x the time: keep {'numpy' if a <= b else 'tsdownsample'} as the default")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
