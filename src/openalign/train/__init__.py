"""Training: optimisers, schedules, gradient caching, checkpoints and the training loop."""
