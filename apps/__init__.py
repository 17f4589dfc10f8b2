"""Command-line programs: `python -m apps.generate`, `python -m apps.convert`, `python -m apps.train_demo`."""
