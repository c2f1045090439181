"""Many concepts at once: a manifest checked whole, then one concept after another or one Ray task each."""
from .manifest import BatchItem, read_manifest
from .runner import BatchContext, ConceptDone, learn_line, run_in_process, run_on_ray, write_summary

__all__ = ["BatchContext", "BatchItem", "ConceptDone", "learn_line", "read_manifest", "run_in_process", "run_on_ray",
           "write_summary"]
