"""Shared-memory segments: the broker creates and unlinks them, clients only map them.

One segment per stream.  Its layout (all integers little-endian)::

    offset  size  field
    0       8     magic            b"SLABCAST"
    8       4     u32 layout       3 (2: no frame descriptor ring; 1: no generation table)
    12      4     u32 header_bytes where slab 0 starts: header_bytes(nslabs), a multiple of 4096
    16      8     u64 slab_bytes   size of one slab, a multiple of 4096
    24      4     u32 nslabs       number of slabs
    28      4     u32 sample_bytes dtype itemsize * channels
    32      4     u32 channels
    36      4     u32 broker_pid
    40      8     f64 rate         samples per second, 0.0 when unknown
    48      16    dtype            numpy dtype string ("<f4", "|u1"), NUL padded
    64      8     u64 epoch        random number chosen at broker start
    72      64    stream name      UTF-8, NUL padded
    136     120   the ring's words: slots, descriptor size, offset, position, wake counts, closed
                                   (:mod:`slabcast.core.ring`); zero in layout 2
    256     4*n   u32 gen[nslabs]  generation of each slab, bumped by the broker each time it
                                   hands the slab to the publisher to be written again
    ...     ...   zero up to header_bytes = 4096 * ceil((256 + 4 * nslabs) / 4096)
    header_bytes + i * slab_bytes  slab i
    after the slabs               per-sample time tables (streams with timestamps)
    ring_offset                   the frame descriptor ring, RING_SLOTS descriptors of 64 bytes

Where each part lies is :class:`slabcast.core.geometry.Geometry`'s to say.

Within a slab, the first ``reserve`` bytes receive the tail of the previous slab
(``carry`` bytes, copied by the publisher when it moves on), so every chunk lies
contiguously inside the slab of the frame that completes it.

Leases are kernel record locks (``F_OFD_SETLK``) on the segment's file, on the
byte ``LOCK_BASE + i`` for slab ``i`` (far past the end of the data: the locks
guard nothing by themselves, they are a cross-process, crash-safe reference
count).  A reader takes a shared lock, *then* checks that ``gen[i]`` is still the
generation its notice named; the broker takes an exclusive lock, *then* bumps
``gen[i]``, before it lets the publisher overwrite slab ``i``.  The kernel orders
the two, so a reader either holds a slab the broker cannot take, or sees the new
generation and knows its chunk is gone.  A process that dies, even by
``kill -9``, loses its locks with its file descriptors.

Liveness is told by locks too, never by a process id (PIDs differ between PID
namespaces: containers that share ``/dev/shm``).  The broker holds an exclusive
lock on byte ``OWNER_BYTE`` of each segment it created, for as long as it lives;
the publisher a shared lock on ``PUBLISHER_BYTE``; each local subscriber a shared
lock on ``CLIENT_BASE + slot`` (its random slot, sent in ATTACH).  Whoever asks
"is it alive?" tests the byte with ``F_OFD_GETLK``.

Segments are named ``slabcast.<broker pid>.<epoch hex>.<n>`` so that a broker can
tell which segments belong to a broker that no longer runs (see :func:`reap_stale`).
Only the broker unlinks.  Clients map segments with ``shm_open`` + ``mmap``
directly, never through :class:`multiprocessing.shared_memory.SharedMemory`, so
Python's resource tracker never learns of (and never unlinks) them.
"""

from __future__ import annotations

import _posixshmem  # the C module behind multiprocessing.shared_memory (POSIX only)
import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import mmap
import os
import re
import secrets
import struct
import time
from collections.abc import Sequence
from typing import Any

from .._exceptions import ShmFullError
from .geometry import GEN_OFFSET, PAGE, header_bytes

log = logging.getLogger("slabcast.shm")

__all__ = [
    "GEN_OFFSET",
    "HEADER_BYTES",
    "Segment",
    "attach",
    "attach_page",
    "broker_segments",
    "header_bytes",
    "hold",
    "lock_held",
    "lock_slab",
    "open_locks",
    "pid_alive",
    "populate",
    "reap_stale",
    "segment_prefix",
]

MAGIC = b"SLABCAST"
LAYOUT = 3
HEADER_BYTES = PAGE  # the smallest header; see header_bytes()
LOCK_BASE = 1 << 40  # lock byte of slab i: LOCK_BASE + i
OWNER_BYTE = 1 << 41  # held (exclusive) by the broker that created the segment, for its lifetime
PUBLISHER_BYTE = OWNER_BYTE + 1  # held (shared) by the stream's publisher
CLIENT_BASE = 1 << 42  # CLIENT_BASE + slot: held (shared) by a local subscriber
_TMP_PREFIX = "slabcast-new."  # a segment being created; renamed once locked and allocated
_YOUNG = 60.0  # seconds: a segment still being created is never older than this
# struct flock on Linux x86-64/aarch64: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = struct.Struct("hhqqi4x")
_HEADER = struct.Struct("<8sIIQIIIId16sQ64s")
SHM_DIR = "/dev/shm"
_NAME = re.compile(r"slabcast\.(\d+)\.[0-9a-f]+\.\d+")


def lock_slab(fd: int, slab: int, kind: int) -> bool:
    """Take (``fcntl.F_RDLCK``/``F_WRLCK``) or drop (``F_UNLCK``) the lease lock of ``slab``; never waits.

    Returns ``False`` when a conflicting lock is held by another open file.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, 0, LOCK_BASE + slab, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def lock_held(fd: int, byte: int) -> bool:
    """Whether another open file holds a lock on ``byte`` (its owner is alive, in whatever PID namespace)."""
    raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, byte, 1, 0))
    return bool(_FLOCK.unpack(raw)[0] != fcntl.F_UNLCK)


def hold(fd: int, byte: int, kind: int = fcntl.F_RDLCK) -> None:
    """Take a lock on ``byte`` for as long as ``fd`` stays open (a liveness mark)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, 0, byte, 1, 0))


def open_locks(name: str) -> int:
    """Open segment ``name`` read-only for lease locks; the caller closes the descriptor."""
    return int(_posixshmem.shm_open("/" + name, os.O_RDONLY, 0))


def segment_prefix(pid: int, epoch: int) -> str:
    """Return the name prefix of every segment made by broker ``pid`` in ``epoch``."""
    return f"slabcast.{pid}.{epoch:08x}."


_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h


@functools.cache
def _libc_fallocate() -> Any:
    """libc's ``fallocate64(2)`` (64-bit offsets on every ABI; Python's os module has only posix_fallocate),
    or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


class Segment:
    """A segment created by the broker: mapped read-write, unlinked by :meth:`destroy`.

    It is created under a temporary name, locked (``OWNER_BYTE``), allocated and
    only then renamed to ``name``: a reaper never sees a segment of that name
    unlocked while its creator lives, in whatever PID namespace.  Python's resource
    tracker is not involved: after a ``kill -9`` of the broker, the next broker
    removes its segments (:func:`reap_stale`).
    """

    def __init__(
        self,
        name: str,
        nbytes: int,
        mode: int = 0o600,
        shm_dir: str = SHM_DIR,
        commit: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        tmp = f"{_TMP_PREFIX}{os.getpid()}.{secrets.token_hex(6)}"
        try:
            fd = _posixshmem.shm_open("/" + tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
        except OSError as exc:
            raise ShmFullError(f"cannot create shared-memory segment {name!r} of {nbytes} bytes: {exc}") from exc
        self.name = name
        self.nbytes = nbytes
        self.fd = fd  # holds the owner lock until closed
        try:
            hold(fd, OWNER_BYTE, fcntl.F_WRLCK)  # "its broker is alive", until the descriptor closes
            os.ftruncate(fd, nbytes)
            # ftruncate alone succeeds on a full tmpfs and the first touch of a page then
            # kills the process with SIGBUS; allocating the pages first fails cleanly instead.
            self.commit([(0, nbytes)] if commit is None else commit)
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
            os.rename(os.path.join(shm_dir, tmp), os.path.join(shm_dir, name))
            mm = mmap.mmap(fd, nbytes)
        except OSError:
            with contextlib.suppress(OSError):
                _posixshmem.shm_unlink("/" + tmp)
            os.close(fd)
            raise
        self._mm: mmap.mmap | None = mm
        self.buf: memoryview = memoryview(mm)

    def commit(self, ranges: Sequence[tuple[int, int]], headroom: bool = False) -> None:
        """Allocate the pages of ``ranges`` (``(offset, length)`` in bytes) so that writing them cannot SIGBUS.

        The rest of the segment stays a hole: address space, no memory.  Only
        committed bytes may be written; reading a hole reads zeros.

        ``headroom``: also leave 1/16 of /dev/shm (at most 64 MiB) free for other
        programs (growing a running stream's pool for a subscriber).

        Raises
        ------
        ShmFullError
            When /dev/shm has no room for them (nothing written is lost: the
            segment stays as it was, usable up to what was committed before).
        """
        page = mmap.PAGESIZE
        need = sum((-(-(off + n) // page) - off // page) * page for off, n in ranges if n > 0)  # whole pages
        keep = 0
        try:
            st = os.fstatvfs(self.fd)
            free = st.f_bavail * st.f_frsize
            if headroom:
                keep = min(64 << 20, st.f_blocks * st.f_frsize // 16)
        except OSError:
            free = need
        try:
            if need > free - keep:  # fail before filling /dev/shm for everyone else, one slab at a time
                kept = f", keeping {keep >> 20} MiB free for other programs" if keep else ""
                raise OSError(errno.ENOSPC, f"{free} bytes are free{kept}")
            for offset, length in ranges:
                if length > 0:
                    os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                mib = -(-need // (1 << 20))
                raise ShmFullError(
                    f"/dev/shm has no room for {need} more bytes ({mib} MiB) of segment {self.name!r}: "
                    f"{exc.strerror}; free space there, give it more (Docker: docker run --shm-size=...; "
                    "Kubernetes: an emptyDir with medium: Memory), or ask for fewer/smaller slabs (nslabs, slab_bytes)"
                ) from exc
            raise

    def release(self, ranges: Sequence[tuple[int, int]]) -> bool:
        """Give the whole pages inside ``ranges`` back to /dev/shm (``FALLOC_FL_PUNCH_HOLE``); they read as
        zeros, and must be committed again before anything reads or writes them.  Bytes of a page only
        partly inside a range are zeroed, the page kept.  Returns False, having given back nothing more,
        where the kernel or libc cannot punch holes.
        """
        fallocate = _libc_fallocate()
        if fallocate is None:
            return False
        for offset, length in ranges:
            if length > 0 and fallocate(self.fd, _PUNCH_HOLE | _KEEP_SIZE, offset, length) != 0:
                log.warning("shared memory cannot be given back here (fallocate punch hole on %s: %s); pools "
                            "keep what they grew to", self.name, os.strerror(ctypes.get_errno()))  # fmt: skip
                return False
        return True

    @property
    def allocated(self) -> int:
        """Bytes of /dev/shm the segment holds now (its allocated blocks, not its size)."""
        return os.fstat(self.fd).st_blocks * 512

    def write_header(self, **fields: Any) -> None:
        """Fill the header described in this module's docstring."""
        packed = _HEADER.pack(
            MAGIC,
            LAYOUT,
            fields["header_bytes"],
            fields["slab_bytes"],
            fields["nslabs"],
            fields["sample_bytes"],
            fields["channels"],
            fields["broker_pid"],
            float(fields["rate"] or 0.0),
            fields["dtype"].encode(),
            fields["epoch"],
            fields["name"].encode(),
        )
        self.buf[: len(packed)] = packed

    def destroy(self) -> None:
        """Unlink and unmap the segment (idempotent); the owner lock goes last, with the descriptor."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        with contextlib.suppress(BufferError):  # views of it are alive: they keep the mapping
            self.buf.release()
        del self.buf
        with contextlib.suppress(FileNotFoundError):
            _posixshmem.shm_unlink("/" + self.name)
        with contextlib.suppress(BufferError):  # a view is still alive in the broker: it keeps the mapping
            mm.close()
        os.close(self.fd)


def attach(name: str, nbytes: int, writable: bool = False) -> mmap.mmap:
    """Map an existing segment, without registering it with the resource tracker.

    Raises
    ------
    FileNotFoundError
        If the segment does not exist (the broker is gone or restarted).
    """
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR if writable else os.O_RDONLY, 0)
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"segment {name!r} has {size} bytes, expected at least {nbytes}")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return mmap.mmap(fd, nbytes, access=access)
    finally:
        os.close(fd)


_MADV_POPULATE_WRITE = 23  # Linux 5.14 (not in Python 3.11's mmap module)


def populate(mm: mmap.mmap, ranges: Sequence[tuple[int, int]]) -> bool:
    """Make the page tables of ``ranges`` (segment bytes ``[start, stop)``, committed memory only: a hole would
    be allocated) of a writable mapping now, in one system call each, instead of a page fault at the first
    touch of each page on the frame's path (1.8 us each in a VM; a 4 KiB writer took one per frame on its
    first lap of the pool).  False where the kernel lacks ``MADV_POPULATE_WRITE`` (before 5.14) or refuses (no
    memory for the page tables): the pages then fault in as they are first written, as before.  It holds the
    GIL (``mmap.madvise``): callers give the pool at open or one slab, not more."""
    for start, stop in ranges:
        start = -(-start // PAGE) * PAGE
        stop = stop // PAGE * PAGE
        if stop <= start:
            continue
        try:
            mm.madvise(_MADV_POPULATE_WRITE, start, stop - start)
        except OSError:
            return False
    return True


def attach_page(name: str, offset: int) -> mmap.mmap | None:
    """Map one page of a segment read-write (a subscriber's sleeper byte lies there), or None when this
    process may only read the segment (group sharing with a read-only mode)."""
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0)
    except PermissionError:
        return None
    try:
        return mmap.mmap(fd, mmap.PAGESIZE, offset=offset)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Return whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # no procfs: trust kill()
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")


def broker_segments(pid: int | None = None, shm_dir: str = SHM_DIR) -> list[str]:
    """Names of the slabcast segments that exist now: all of them, or those of broker ``pid``."""
    prefix = "slabcast." if pid is None else f"slabcast.{pid}."
    try:
        return sorted(n for n in os.listdir(shm_dir) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def reap_stale(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the segments of brokers that no longer run; return their names.

    Only names of the form ``slabcast.<pid>.<epoch>.<n>`` are looked at, and a
    segment is left alone while its owner lock is held: a live broker holds it,
    whatever its PID namespace (a PID seen from here says nothing about a broker
    in another container sharing ``/dev/shm``).  Other software's segments are
    never touched.
    """
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        creating = name.startswith(_TMP_PREFIX)
        if _NAME.fullmatch(name) is None and not creating:
            continue
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, 0)
        except OSError:
            continue
        try:
            alive = lock_held(fd, OWNER_BYTE)
            if creating and not alive:  # its creator may lock it any microsecond now: only if long left
                alive = time.time() - os.fstat(fd).st_ctime < _YOUNG
        finally:
            os.close(fd)
        if alive:
            continue
        try:
            _posixshmem.shm_unlink("/" + name)
            removed.append(name)
        except OSError:
            pass
    return removed
