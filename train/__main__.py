"""`python -m dsv4.train ...` (and `torchrun --nproc-per-node=N -m dsv4.train ...`): the same job as `dsv4-train`."""

from .main import main

main()
