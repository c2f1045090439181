"""Benchmarks: training speed (train_speed.py) and the ShapesWorld quality benchmark (shapesworld/)."""
