"""wmlab: latent world models that plan, and the study of which representation plans best."""

__version__ = "0.1.0"
