"""Training: convert an AR model into a tri-mode model with the joint AR + diffusion objective (SPEC 4)."""
