"""Reference data: the embedded task's files, samples of the reference model, their rewards."""
