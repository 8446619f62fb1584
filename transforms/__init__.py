"""Beam transforms of the cascade pipeline: reading, stages, outputs."""
