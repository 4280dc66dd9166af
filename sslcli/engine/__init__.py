"""The shared engine: schedules, EMA, queues, optimisers, the training loop and its helpers."""
