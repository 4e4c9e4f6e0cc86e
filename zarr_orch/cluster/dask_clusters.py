"""Dask modes (being written)."""
