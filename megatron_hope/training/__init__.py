"""The training loop and its parts: optimizer, LR schedule, gradient clipping, metrics."""
