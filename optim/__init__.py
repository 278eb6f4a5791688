"""dsv4.optim: optimizers (the distributed Muon lands here; see optim/README.md)."""
