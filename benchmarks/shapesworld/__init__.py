"""ShapesWorld: a procedural world with its own text-to-image model, CLIP and metric models (see world.py)."""
