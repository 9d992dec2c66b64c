"""The results store: JSON run records, SQLite, CSV/Parquet export, regressions, anchors."""
