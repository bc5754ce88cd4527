"""Training: the masked-frame objective, the sharded train step, checkpoints."""
