"""e2e-dist: end-to-end models on Ray Train + DeepSpeed, with W&B tracking and S3 checkpoints."""

__version__ = "0.1.0"
