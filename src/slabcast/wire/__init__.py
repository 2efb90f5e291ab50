"""The wire protocol: every message kind and field order, defined once (docs/protocol.md).

Internal: the public names are re-exported by :mod:`slabcast`."""
