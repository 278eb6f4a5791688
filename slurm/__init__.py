"""dsv4.slurm: multi-node launch as SLURM jobs (`dsv4-submit`: render an sbatch script from the config, submit it)."""
