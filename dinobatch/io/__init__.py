"""Files and folders: the walk, atomic writes, Arrow/Parquet tables, locks, text for terminals."""
