"""Load a ComfyUI checkout (COMFYUI_PATH) in-process with this pack registered, for the build tools.

    from comfy_boot import boot
    nodes = boot()          # ComfyUI's `nodes` module: NODE_CLASS_MAPPINGS has stock nodes and ours

ComfyUI parses its command line at import, so this sets ``--cpu`` first; the pack is loaded with
ComfyUI's own ``load_custom_node`` (so ``python_module`` is ``custom_nodes.<folder name>``, as in a
server). Nothing of ComfyUI is copied here.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def boot():
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy").is_dir():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (0.8.0 or later); the tools read its node definitions")
    sys.path.insert(0, path)
    cwd, argv = os.getcwd(), sys.argv
    os.chdir(path)
    sys.argv = [argv[0], "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses the arguments)

        # ComfyUI's own `utils` package before `nodes`, as main.py does (line 11, `import utils.extra_config`):
        # nodes.py puts comfy/ first on sys.path, after which `utils` would be comfy/utils.py and
        # comfy_extras/nodes_images.py's `from server import PromptServer` (server -> utils.install_util) fails
        import utils.extra_config  # noqa: F401

        import nodes
    finally:
        sys.argv = argv
        os.chdir(cwd)

    async def setup():
        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        if not await nodes.load_custom_node(str(ROOT)):
            sys.exit(f"ComfyUI could not load the pack at {ROOT}")
    asyncio.run(setup())
    return nodes


def node_info(nodes, node_type: str) -> dict:
    """The node's definition as ComfyUI's /object_info serves it (V1 layout), for V1 and V3 nodes."""
    cls = nodes.NODE_CLASS_MAPPINGS[node_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}}
