"""The training loop, objectives, optimizers, checkpoints and metric logging."""
