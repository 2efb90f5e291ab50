"""``slabcast view``: a live view of a broker's streams in the browser (the ``view`` extra)."""
