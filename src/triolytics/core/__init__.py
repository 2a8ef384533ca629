"""The sans-I/O core: decoding, validation, enrichment, sessions, dedup, WebSocket frames
and the journal's format. Plain functions and classes that take bytes and `now` and
return values; nothing here imports trio, h11, DuckDB or a WebSocket library
(tests/test_layering.py checks it)."""
