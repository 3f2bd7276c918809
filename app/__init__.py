"""The top floor: the command line (``python -m app``, what ``./run.sh`` calls), the Hydra
sweep callback (progress, summary, report), tuning presets and launcher set-up. It imports
every other package; none imports it."""
