"""The batch jobs: classify and scan, from a folder to rows and a summary."""
