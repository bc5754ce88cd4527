"""Pure Flax NNX modules: no file I/O, no CLI, no sharding policy (logical axis names only)."""
