"""Segmentation: the user's boxes and clicks (prompts), SAM checkpoints, the segmenter, and mask refinement."""
from .masks import overlay_masks, refine_mask
from .prompts import ObjectPrompt, parse_prompts
from .sam_files import SamConfig, load_sam
from .segmenter import Segmenter

__all__ = ["ObjectPrompt", "SamConfig", "Segmenter", "load_sam", "overlay_masks", "parse_prompts", "refine_mask"]
