"""PrivAttNet in JAX/Flax: privacy risk scores and attention heat maps for images."""
