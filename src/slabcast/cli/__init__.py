"""The `slabcast` command: broker, up, status, top, record, keygen, bench, demo.

Internal: the public names are re-exported by :mod:`slabcast`."""
