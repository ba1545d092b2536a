"""Build the workflow JSON files: UI graphs for the editor, API twins for /prompt, thumbnails.

    COMFYUI_PATH=/path/to/ComfyUI python tools/build_workflows.py            # rewrite workflows/
    COMFYUI_PATH=/path/to/ComfyUI python tools/build_workflows.py --check    # write nothing; exit 1 if a file differs

Each workflow is described once as nodes with their widget values by name and their links, one function per
pipeline in tools/workflow_graphs_*.py (generation, editing, grounding, dit); tools/workflow_format.py writes the two
formats from them, the saved ``widgets_values`` generated from the node definitions of the ComfyUI at
COMFYUI_PATH and checked against each input's type, range and options.
Writes ``workflows/<name>.json`` (UI, LiteGraph version 0.4; the editor's template browser lists
these) and ``workflows/api/<name>_api.json`` (API format). Thumbnails: tools/build_help_images.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from comfy_boot import node_info  # noqa: E402
from workflow_format import api_format, ui_format  # noqa: E402
from workflow_graphs_dit import capture_flow_graph, capture_flux_graph, capture_sd3_graph  # noqa: E402
from workflow_graphs_dit_edit import (  # noqa: E402
    p2p_flow_graph,
    p2p_flux_graph,
    p2p_sd3_graph,
    prompt_mix_flow_graph,
    prompt_mix_flux_graph,
    rf_p2p_flow_graph,
    rf_p2p_flux_graph,
)
from workflow_graphs_editing import dpl_graph, nti_p2p_graph, p2p_graph  # noqa: E402
from workflow_graphs_generation import (  # noqa: E402
    capture_graph,
    flow_txt2img_graph,
    prompt_mix_graph,
    spatext_graph,
    structure_graph,
)
from workflow_graphs_grounding import grounding_graph  # noqa: E402

from attention import cli  # noqa: E402  (standard library only)

OUT = Path(__file__).resolve().parents[1] / "workflows"


GRAPHS = (("attention_capture", capture_graph, False), ("attention_capture_shapesworld", capture_graph, True),
          ("prompt_mixing", prompt_mix_graph, False), ("prompt_mixing_shapesworld", prompt_mix_graph, True),
          ("p2p_edit", p2p_graph, False), ("p2p_edit_shapesworld", p2p_graph, True),
          ("nti_p2p_edit", nti_p2p_graph, False), ("nti_p2p_edit_shapesworld", nti_p2p_graph, True),
          ("dpl_edit", dpl_graph, False), ("dpl_edit_shapesworld", dpl_graph, True),
          ("structure_diffusion", structure_graph, False), ("structure_diffusion_shapesworld", structure_graph, True),
          ("spatext", spatext_graph, False), ("spatext_shapesworld", spatext_graph, True),
          ("grounding", grounding_graph, False), ("grounding_shapesworld", grounding_graph, True),
          ("flow_txt2img_shapesworld", flow_txt2img_graph, True),     # ShapesWorld-Flow only (no SD variant)
          ("attention_capture_shapesworld_flow", capture_flow_graph, True),   # DiT: ShapesWorld-Flow, Flux, SD3.5
          ("attention_capture_flux", capture_flux_graph, False), ("attention_capture_sd3", capture_sd3_graph, False),
          ("p2p_edit_shapesworld_flow", p2p_flow_graph, True),           # DiT editing (workflow_graphs_dit_edit)
          ("p2p_edit_flux", p2p_flux_graph, False), ("p2p_edit_sd3", p2p_sd3_graph, False),
          ("rf_p2p_edit_shapesworld_flow", rf_p2p_flow_graph, True), ("rf_p2p_edit_flux", rf_p2p_flux_graph, False),
          ("prompt_mixing_shapesworld_flow", prompt_mix_flow_graph, True),
          ("prompt_mixing_flux", prompt_mix_flux_graph, False))


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--out", type=cli.output_dir, default=str(OUT),
                   help="folder to write the UI graphs into (created if missing); the API twins go to its api/")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 and name the files that differ from what would be written")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    from comfy_boot import boot  # after the arguments: --help and bad flags need no ComfyUI
    comfy_nodes = boot()
    stale = []
    if not args.check:
        (out_dir / "api").mkdir(parents=True, exist_ok=True)
    for name, build, sw in GRAPHS:
        nodes, notes = build(sw)
        infos = {n.type: node_info(comfy_nodes, n.type) for n in nodes}
        files = {out_dir / f"{name}.json": json.dumps(ui_format(nodes, notes, infos), indent=1) + "\n",
                 out_dir / "api" / f"{name}_api.json": json.dumps(api_format(nodes, infos), indent=1) + "\n"}
        for path, text in files.items():
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path.relative_to(out_dir)))
            else:
                path.write_text(text)
        if not args.check:
            print("wrote", name)
    if args.check:
        print(f"{len(stale)} of {2 * len(GRAPHS)} files differ from the builder{': ' if stale else ''}"
              f"{', '.join(stale)}" + (" (run tools/build_workflows.py to rewrite them)" if stale else ""))
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
