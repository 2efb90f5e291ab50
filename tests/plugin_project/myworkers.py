"""A user's worker: sound level of every 0.5 s of a stream, sent back on a queue."""

import numpy as np

import slabcast


def spl_worker(address, stream, results):
    """Subscribe to ``stream`` and report (t0, level in dBFS) per 0.5 s chunk until the stream ends."""
    with slabcast.Subscriber(stream, seconds=0.5, clip=True, address=address) as sub:
        results.put("ready")
        for chunk in sub:
            with chunk:
                rms = float(np.sqrt(np.mean(np.square(chunk.data, dtype=np.float64))))
            results.put((chunk.t0, 20 * np.log10(rms)))
    results.put("done")


def stuck_worker():
    """A worker that never ends (to show the plugin failing a test that leaves it running)."""
    import threading

    threading.Event().wait()


def failing_worker(results):
    """A worker that raises before it sends anything (to show ``slabcast_workers.get`` failing at once)."""
    raise RuntimeError("this worker fails, as the test asks")


def silent_worker(results, *, say=None):
    """A worker that exits 0, putting ``say`` on ``results`` if given (keyword arguments through ``spawn``)."""
    if say is not None:
        results.put(say)
