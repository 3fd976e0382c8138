"""What a run leaves: its resumable state, results.json and results.md, plots, prediction files."""
