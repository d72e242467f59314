"""Video-VAE targets: the latent spaces the alignment and reconstruction stages bridge into."""
