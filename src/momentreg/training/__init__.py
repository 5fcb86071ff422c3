"""Training: the methods (one loss per method), their configuration, the loop with exact
resume, and the compute a step costs."""
