"""Imports every loader module so that each registers its dataset kind."""

from meddiff.data import medmnist, phantom_dataset  # noqa: F401
