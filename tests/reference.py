"""An independent, brute-force statement of the rechunking rules, used as the tests' oracle."""

from __future__ import annotations


def expected_chunks(frames, size, clip, rate=None, pause=None):
    """Return [(index, n, t0)] for frames given as [(n, t0)], by walking sample by sample.

    ``pause`` is a constant sampler value in seconds (or None): with a rate it skips
    ``ceil(pause * rate)`` samples after each chunk; without one, the frames whose time is
    before the chunk's frame time plus ``pause`` (a frame older than the one before ends the
    pause: the clock stepped back).  Deliberately slow and literal: every sample is visited,
    so it shares no shortcut with the code.
    """
    import math

    out = []
    acc_start = None
    acc_t0 = None
    pause_until = None
    skip_left = 0
    last_t0 = None
    index = 0
    for n, t0 in frames:
        if rate is None and pause_until is not None and last_t0 is not None and t0 < last_t0:
            pause_until = None
        last_t0 = t0
        k = 0
        while k < n:
            i = index + k
            t = t0 + k / rate if rate else t0
            if skip_left > 0:
                skip_left -= 1
                k += 1
                continue
            if pause_until is not None:
                if k > 0 or t0 < pause_until:
                    break  # rest of frame / whole frame skipped
                pause_until = None
            if acc_start is None:
                acc_start, acc_t0 = i, t
            have = i + 1 - acc_start
            frame_end = k == n - 1
            if (clip and have == size) or (not clip and frame_end and have >= size):
                out.append((acc_start, have, acc_t0))
                acc_start = None
                if pause is not None:
                    if rate:
                        skip_left = math.ceil(pause * rate - 1e-9)
                    else:
                        pause_until = t0 + pause
            k += 1
        index += n
    return out
