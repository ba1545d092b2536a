"""ComfyUI glue: the only package of Attention Lab that imports ``comfy``."""
