"""Run the fan-out and latency benchmarks, print the tables, write JSON and PNG plots to benchmarks/results/.

    .venv/bin/python benchmarks/run_all.py            # the full run (about 12 minutes on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick    # a smoke test (about 1 minute): numbers not for quoting

Plots need matplotlib (``pip install -e ".[bench]"``); the broker profile needs
py-spy (``pip install py-spy``) and permission to ptrace the broker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import fanout
import latency


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small streams, 1 trial: a smoke test")
    ap.add_argument("--trials", type=int, default=None, help="trials per configuration (default 3, quick 1)")
    ap.add_argument("--touch", choices=("page", "full"), default="page", help="fan-out consumer work per chunk")
    ap.add_argument(
        "--profile",
        choices=("python", "native", "none"),
        default=None,
        help="py-spy the broker and one subscriber in an extra fan-out trial (default: python if py-spy is installed)",
    )
    ap.add_argument("--only", choices=("fanout", "latency"), default=None)
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="S",
        help="before each trial wait up to S s for other programs to use < 0.3 cores (default 10, quick 0)",
    )
    args = ap.parse_args(argv)
    trials = args.trials or (1 if args.quick else 3)
    quiet = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 10.0)
    spy = Path(sys.executable).with_name("py-spy")
    profile = args.profile or ("python" if spy.exists() or shutil.which("py-spy") else "none")
    stamp = C.timestamp()
    C.RESULTS.mkdir(exist_ok=True)

    res: dict[str, Any] = {"machine": C.machine_info(), "quick": args.quick}
    print(_machine_line(res["machine"]), flush=True)
    res["memcpy"] = C.memcpy_bandwidth(args.quick)
    print(fanout.memcpy_report(res["memcpy"]), flush=True)
    if args.only in (None, "fanout"):
        print(f"\nfan-out ({trials} trial(s) per configuration, interleaved):", flush=True)
        prof = None
        if profile != "none":
            prof = {t: str(C.RESULTS / f"profile-{stamp}-{t}-{profile}.txt") for t in ("broker", "sub0")}
            fanout.SPY_NATIVE = profile == "native"
        res["fanout"] = fanout.run(trials, args.quick, args.touch, profile=prof, quiet_wait=quiet)
    if args.only in (None, "latency"):
        print(f"\nlatency ({trials} trial(s) per configuration, interleaved):", flush=True)
        res["latency"] = latency.run(trials, args.quick, quiet_wait=quiet)
    res["machine"]["loadavg_end"] = os.getloadavg()
    path = C.write_json(f"run-{stamp}", res)

    print("\n" + _machine_line(res["machine"]))
    print("\nmemcpy:\n" + fanout.memcpy_report(res["memcpy"]))
    if "fanout" in res:
        print("\nfan-out:\n" + fanout.report(res["fanout"]))
    if "latency" in res:
        print("\nlatency:\n" + latency.report(res["latency"]))
    print(f"\nresults: {path}")
    for png in plot(res, stamp):
        print(f"plot: {png}")
    return 0


def _machine_line(m: dict[str, Any]) -> str:
    return (
        f"machine: {m['cpu_model']}, {m['cores']} cores, {m['mem_gib']} GiB, Linux {m['kernel']}; "
        f"Python {m['python']}, numpy {m['numpy']}, pyzmq {m['pyzmq']} (libzmq {m['libzmq']}), msgpack {m['msgpack']}; "
        f"load average {m['loadavg'][0]:.2f} at start; slabcast at {m['git_head']}"
    )


def plot(res: dict[str, Any], stamp: str) -> list[Path]:
    """PNG plots of a run; none if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plots; pip install -e '.[bench]')")
        return []
    out = []
    if "fanout" in res:
        s = res["fanout"]["summary"]
        systems = [x for x in ("slabcast", "slabcast_s0", "ppe", "zmq") if f"{x}-1" in s]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, metric, title in (
            (axes[0], "aggregate_Bps", "aggregate delivered (sum over subscribers)"),
            (axes[1], "ingest_Bps", "publisher ingest"),
        ):
            width = 0.8 / len(systems)
            for i, system in enumerate(systems):
                meds, lo, hi = [], [], []
                for n in (1, 8):
                    v = s[f"{system}-{n}"][metric]
                    meds.append(v["median"] / 1e9)
                    lo.append((v["median"] - v["min"]) / 1e9)
                    hi.append((v["max"] - v["median"]) / 1e9)
                xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(2)]
                ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=system)
            ax.set_xticks([0, 1], ["1 subscriber", "8 subscribers"])
            ax.set_ylabel("GB/s (median, min-max)")
            ax.set_title(title, fontsize=10)
            mc = res["memcpy"]["256MiB_out_of_cache"]["median"] / 1e9
            ax.axhline(mc, color="grey", ls="--", lw=0.8)
            ax.text(1.45, mc, "memcpy 256 MiB", fontsize=7, ha="right", va="bottom", color="grey")
        axes[0].legend()
        fig.suptitle("slabcast fan-out, 64 KiB frames (uint8), chunks 16 KiB - 1 MiB", fontsize=11)
        fig.tight_layout()
        path = C.RESULTS / f"run-{stamp}-fanout.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    if "latency" in res:
        trials = res["latency"]["trials"]
        fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, sharey=True)
        for r, frame in enumerate(latency.FRAMES):
            for c, nsubs in enumerate(latency.SUBS):
                ax = axes[r][c]
                for system in ("slabcast", "slabcast_s0", "zmq", "unix"):
                    recs = trials.get(f"{system}-{frame}B-{nsubs}sub")
                    if not recs:
                        continue
                    for k, rec in enumerate(recs):
                        pcts = [i / 2 for i in range(len(rec["cdf_us"]))]
                        ax.plot(
                            rec["cdf_us"],
                            pcts,
                            color={"slabcast": "C0", "slabcast_s0": "C3", "zmq": "C1", "unix": "C2"}[system],
                            alpha=0.8,
                            lw=1,
                            label=system if k == 0 else None,
                        )
                ax.set_xscale("log")
                ax.axvline(100, color="grey", ls="--", lw=0.8)
                ax.set_title(f"{frame} B frames, {nsubs} subscriber(s)", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if r == 1:
                    ax.set_xlabel("write -> chunk in hand (us)")
                if c == 0:
                    ax.set_ylabel("percentile")
                ax.legend(fontsize=8)
        fig.suptitle("latency CDF, one line per trial (dashed: 100 us target)", fontsize=11)
        fig.tight_layout()
        path = C.RESULTS / f"run-{stamp}-latency.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out


if __name__ == "__main__":
    sys.exit(main())
