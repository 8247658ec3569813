"""bench: suites of optimizer experiments run on Ray Tune, tracked in MLflow, compared with the papers' numbers."""

__version__ = "0.1.0"
