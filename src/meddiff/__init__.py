"""meddiff: medical image synthesis with diffusion models.

Data flow: data -> conditioning -> models -> training -> sampling -> evaluation -> report.
"""

__version__ = "0.1.0"
