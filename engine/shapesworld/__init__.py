"""ShapesWorld, the embedded default model: its renderer (world.py) and the trained model (model.py)."""
from .model import GUIDANCE, MODEL_DIR, SAMPLER_STEPS, clip_towers, load_shapesworld

__all__ = ["GUIDANCE", "MODEL_DIR", "SAMPLER_STEPS", "clip_towers", "load_shapesworld"]
