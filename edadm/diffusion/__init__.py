"""Diffusion models: loading, the embedded default, samplers, the trajectory dump and feature hooks."""
