"""Parallelism plans applied to a model: the only place that knows the DeviceMesh."""
