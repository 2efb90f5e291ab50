"""``slabcast view``: a live view of a broker's streams in the browser (the ``view`` extra).

Layout: ``frames.py`` is the sans-io core (the stream list, levels, the binary display
frame); ``app.py`` the web shell around it (Starlette, one websocket per page, one
drop-policy ``Window`` per drawn stream); ``static/`` the page (plain JS and the
vendored uPlot). ``slabcast.cli.view`` parses the options and runs uvicorn.
"""
