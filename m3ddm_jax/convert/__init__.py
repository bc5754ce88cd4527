"""PyTorch checkpoints -> Flax: safe loading, name/layout mapping, per-family converters."""
