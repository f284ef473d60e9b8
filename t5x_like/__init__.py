"""t5x_like: one readable JAX/Flax trainer for pretraining, tuning and scaling-law sweeps."""
