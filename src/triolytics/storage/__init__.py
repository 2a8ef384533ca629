"""Storage: the writer task that owns the journal and the DuckDB connection, and the
store that loads journaled rows into DuckDB in large columnar batches."""
