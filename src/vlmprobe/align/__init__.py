"""Alignment between a model's representation and a video VAE's latent space (E-P4.5)."""
