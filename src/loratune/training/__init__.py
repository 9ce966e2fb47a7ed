"""Training: the run config, the loop, its optimizer and schedule, checkpoints, data parallelism, evaluation."""
