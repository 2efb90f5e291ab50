"""The sans-io core: the rechunking rules, the slab pool state machine, the shared-memory layout and its locks.

Internal: the public names are re-exported by :mod:`slabcast`."""
