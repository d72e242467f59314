"""Adapters from a model's tokens into a video VAE's latents, trained through its frozen
decoder (E-P4.6)."""
