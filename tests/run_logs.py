"""Reading a run folder's metrics.jsonl in tests (the losses dsv4-train logs at full precision, one line per step)."""

import json
import os


def metrics_rows(run_dir) -> list:
    """The rows of metrics.jsonl so far (none if absent; a line still being written is left out)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            rows.append(json.loads(line))
    return rows


def logged_losses(run_dir) -> dict:
    """step -> loss; a step logged twice (before a crash and after the resume): the later line."""
    return {row["step"]: row["loss"] for row in metrics_rows(run_dir)}
