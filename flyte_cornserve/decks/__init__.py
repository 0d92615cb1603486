"""Decks: what the Flyte console shows of a cornserve node, as self-contained HTML.

`views` holds the data a deck shows; `render` turns a view into one HTML page (inline CSS and SVG,
no network fetches: consoles often run offline). Framework-free: no Redis, no flytekit.
"""
