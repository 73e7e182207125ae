"""Sweeps behind `launch/experiment.py` (grids) and `launch/search.py` (Optuna searches): typed sweep
configs, the torchrun runner, the search loop and the reports."""
