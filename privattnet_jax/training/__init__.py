"""Training: the loop, its setup, the steps, the feeds of batches, checkpoints."""
