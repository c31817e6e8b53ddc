"""MLflow on both sides of a job: the driver owns the run, rank 0 writes the metrics."""
