"""What the tests build and write: tiny checkpoints, SAM files, ComfyUI-detectable models. Tests import it;
the library never does."""
