"""dsv4.train: the training job (`dsv4-train`: main.py, loop.py), data (`dsv4-preprocess`: data.py, preprocess.py),
LR schedules, the FLOPs model, run records and TensorBoard (metrics.py), and `dsv4-export`."""
