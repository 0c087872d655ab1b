"""Entry points: environment detection, process-group set-up, `python -m launch.train`, the quickstart."""
