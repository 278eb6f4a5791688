"""dsv4.train: entry points (`dsv4-smoke`, `dsv4-export`); the training loop lands here."""
