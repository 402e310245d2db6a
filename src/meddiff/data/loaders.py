"""Imports every loader module so that each registers its dataset kind."""

from meddiff.data import chexpert, csvfile, folder, medmnist, mimic, phantom_dataset, store_dataset  # noqa: F401
