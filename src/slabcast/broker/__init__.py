"""The broker: its event loop (control plane), the process that runs it, the lock that keeps one per address.

Internal: the public names are re-exported by :mod:`slabcast`."""
