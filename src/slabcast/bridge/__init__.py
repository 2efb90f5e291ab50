"""Fan-out beyond one machine through Zenoh (``zenoh`` extra): ``slabcast bridge --zenoh`` and the ``zenoh`` source."""
