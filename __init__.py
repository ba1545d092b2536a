"""Attention Lab: attention-control methods for Stable Diffusion as ComfyUI nodes.

ComfyUI loads this folder as a custom-node package and calls ``comfy_entrypoint``.
Outside ComfyUI (pytest collecting the repository, the demo) there is nothing to register; neither is there when
this file is imported as a plain module rather than a package (pytest collecting a checkout whose folder name is
not a Python name, e.g. ``attention-lab``, with ComfyUI on the path: the relative imports below need a package).
"""

# The editor serves this folder at /extensions/<this folder's name>/; its node library shows
# web/docs/<NodeId>.md (or web/docs/<NodeId>/<locale>.md) as each node's help page.
WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

if ComfyExtension is not None and __package__:
    from .nodes.capture import AttentionCapture, AttentionMapView
    from .nodes.cluster import SelfAttnCluster
    from .nodes.dpl import DPLTokenOptimizer
    from .nodes.grounding_dataset import GroundingDatasetAdd, GroundingDatasetLoad
    from .nodes.grounding_features import GroundingFeaturesNode
    from .nodes.grounding_head import GroundingHeadLoader, GroundingHeadTrain
    from .nodes.grounding_segment import GroundedSegment
    from .nodes.inversion import NullTextInvert
    from .nodes.p2p import P2PEditSampler
    from .nodes.prompt_mix import PromptMixSampler
    from .nodes.shapesworld import ShapesWorldLoader, ShapesWorldPseudoMasks, ShapesWorldScenes
    from .nodes.spatext import SpaTextGuider
    from .nodes.structure import StructureDiffusion

    NODES = [AttentionCapture, AttentionMapView, SelfAttnCluster, PromptMixSampler, NullTextInvert,
             DPLTokenOptimizer, P2PEditSampler, StructureDiffusion, SpaTextGuider, ShapesWorldLoader,
             GroundingFeaturesNode, GroundingDatasetAdd, GroundingDatasetLoad, GroundingHeadTrain,
             GroundingHeadLoader, GroundedSegment, ShapesWorldScenes, ShapesWorldPseudoMasks]

    class AttentionLabExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    async def comfy_entrypoint() -> AttentionLabExtension:
        return AttentionLabExtension()
