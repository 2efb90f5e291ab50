"""BufferEmit: ocycle's in-process API on the same rechunking rules.

Internal: the public names are re-exported by :mod:`slabcast`."""
