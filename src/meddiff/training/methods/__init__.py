"""Training methods plugged into the one loop. Importing this package registers them."""

from meddiff.training.methods import autoencoder, diffusion, distill, finetune, latent, volume  # noqa: F401
from meddiff.training.methods.base import METHODS, TrainingMethod  # noqa: F401
