"""The top layer: build a run from config and execute it (runner, source representations, nested runs, sweep reports, results docs)."""
