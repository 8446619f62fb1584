"""Entry points: python -m pipelines.NAME."""
