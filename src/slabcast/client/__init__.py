"""Clients of a broker: the connection, Publisher, Subscriber, Window, control requests, recordings.

Internal: the public names are re-exported by :mod:`slabcast`."""
