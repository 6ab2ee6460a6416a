"""Data: raw files -> tokenized Parquet shards + manifest (``prepare``, ``manifest``), and the
streaming, sharded, resumable reader (``reader``) with dynamic padding (``collate``)."""
