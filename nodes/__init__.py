"""ComfyUI nodes: thin adapters over the engine. The only code in ProtoBooth that imports ComfyUI."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
