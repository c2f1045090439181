"""Models: one record per family, the DiffusionModel the engine trains, loading files, and weights kept in any
dtype but used in the compute dtype."""
