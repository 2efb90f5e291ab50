"""BufferEmit: ocycle's in-process API on the same rechunking rules.

Internal: the public names are re-exported by :mod:`slabcast`.

Where a frame goes, module by module::

    emit.py       BufferEmit: its settings, the frame copied into a buffer, the chunks cut
                  (core/rechunk) and run in this thread (serial) or handed to a pool
    frames.py     FrameFormat: the stream's format, fixed by its first frame; checks each frame
    base.py       what every mode shares: Slab (a buffer), Callbacks (on_done, on_error, the
                  errors to raise), Pool (recycled slabs, the chunks still out: the pool interface)
    threads.py    ThreadPool: callbacks in threads, on copies
    processes.py  ProcessPool: callbacks in spawned processes, chunks in shared-memory slabs,
                  notices and results over a pipe pair per worker (records in wire/protocol.py)
    worker.py     the body of a worker process
"""
