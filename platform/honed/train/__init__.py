"""Ray Train fine-tuning: the per-worker loop and the driver."""
