"""Layer 6, many runs: a sweep's grid, run by one process, under torchrun or by several workers
sharing its folder, its statistics and summary, and its workers as a SLURM job array."""
