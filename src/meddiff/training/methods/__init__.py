"""Training methods plugged into the one loop. Importing this package registers them."""

from meddiff.training.methods import autoencoder, diffusion, finetune, latent, volume  # noqa: F401
from meddiff.training.methods.base import METHODS, TrainingMethod  # noqa: F401
