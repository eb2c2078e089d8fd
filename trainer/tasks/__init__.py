"""Evaluation tasks run inside training and on checkpoints (``eval.tasks``): needle retrieval."""
