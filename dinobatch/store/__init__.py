"""The output folder: rows, cache, file index, runs, and checks of what is read back."""
