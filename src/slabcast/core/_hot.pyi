from collections.abc import Callable

def futex_wait(address: int, expected: int, timeout: float, mask: int = ..., /) -> bool: ...
def futex_wake(address: int, mask: int = ..., /) -> int: ...
def barrier() -> None: ...
def runs(
    raw: bytes, seq: int, head: int, sample_bytes: int, /
) -> list[tuple[int, int, int, int, int, tuple[int, ...], tuple[float, ...]]] | int: ...

class Writer:
    def __init__(
        self, segment: object, ring_offset: int, slots: int, seen: bytearray, fmt: str, itemsize: int, channels: int,
        frame_limit: int,
    ) -> None: ...
    def put(
        self, data: object, t0: object, flags: int, offset: int, end: int, position: int, index: int, floor: int,
        slab: int, gen: int, frame_max: int, first: bool, switch: tuple[int, int, int, int, int] | None = None, /,
    ) -> int: ...
    def close(self) -> None: ...
    @property
    def puts(self) -> int: ...
    stream_min: int

RING_NOW: int
FULL: int
SWITCHED: int
ABI: int

class Rechunker:
    size: int
    clip: bool
    rate: float | None
    sampler: Callable[[], float] | None
    start: int | None
    t0: float
    pause_until: float | None
    pause_at: int | None
    last_t0: float
    jumped: bool
    def __init__(
        self, size: int, clip: bool = ..., rate: float | None = ..., sampler: Callable[[], float] | None = ...
    ) -> None: ...
    def feed(self, index: int, n: int, t0: float, /) -> list[tuple[int, int, float]]: ...
    def needed(self, end: int, /) -> int | None: ...

class Reader:
    def __init__(self, segment: object, ring_offset: int, slots: int) -> None: ...
    def take_one(
        self, start: int, noticed: int, cur_slab: int, hist_slab: int, chunker: Rechunker, /
    ) -> tuple[int, int, float, int, int, int, list[tuple[int, int, float]]] | None: ...
    def close(self) -> None: ...
