"""Headless core of napari-vdsr: no Qt and no napari imports anywhere below this package."""
