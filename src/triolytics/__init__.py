"""triolytics: a self-hostable analytics event collector.

Segment-compatible HTTP capture, acknowledged only once journaled durably,
loaded into one DuckDB file in large columnar batches behind the journal.
"""

__version__ = "0.1.0"
