"""The broker: its event loop (control plane), the process that runs it, hosted sources, addresses.

Internal: the public names are re-exported by :mod:`slabcast`."""
