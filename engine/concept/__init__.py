"""The Concept: what training produces, its two files that stock tools load, and applying it in diffusers."""
from .concept import Concept, ConceptObject, concept_applied, load_concept, save_concept

__all__ = ["Concept", "ConceptObject", "concept_applied", "load_concept", "save_concept"]
