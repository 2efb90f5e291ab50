"""An independent, brute-force statement of the rechunking rules, used as the tests' oracle."""

from __future__ import annotations


def expected_chunks(frames, size, clip, rate=None, pause=None):
    """Return [(index, n, t0)] for frames given as [(n, t0)], by walking sample by sample.

    ``pause`` is a constant sampler value in seconds (or None).  Deliberately slow
    and literal: every sample is visited, so it shares no shortcut with the code.
    """
    out = []
    acc_start = None
    acc_t0 = None
    pause_until = None
    index = 0
    for n, t0 in frames:
        k = 0
        while k < n:
            i = index + k
            t = t0 + k / rate if rate else t0
            if pause_until is not None:
                if rate is None:
                    if k > 0 or t0 < pause_until:
                        break  # rest of frame / whole frame skipped
                elif k < (pause_until - t0) * rate - 1e-9:
                    k += 1
                    continue
                pause_until = None
            if acc_start is None:
                acc_start, acc_t0 = i, t
            have = i + 1 - acc_start
            frame_end = k == n - 1
            if (clip and have == size) or (not clip and frame_end and have >= size):
                out.append((acc_start, have, acc_t0))
                acc_start = None
                if pause is not None:
                    pause_until = (acc_t0 + have / rate if rate else t0) + pause
            k += 1
        index += n
    return out
