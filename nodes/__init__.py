"""VideoBridge nodes (V3 schema). ComfyUI calls ``comfy_entrypoint`` to get the extension and its node list."""
from .api import ComfyExtension
from .paths import register_animatediff_folder
from .scorers import register_reward_folder

register_animatediff_folder()          # before any node lists models/animatediff_models
register_reward_folder()

from .bivdiff import VBDDIMInvert, VBFramewiseGenerate, VBMixLatents, VBPrompt2PromptEdit, VBVideoDenoise  # noqa: E402
from .evs import VBEncapsulatedT2V, VBEVSRefine  # noqa: E402
from .jvid import VBJVIDSample, VBTemporalLatentSmoothing  # noqa: E402
from .i4vgen import VBAnchorCandidates, VBI4VGen, VBNIVSDS, VBSelectAnchor, VBStaticVideo  # noqa: E402
from .frames import VBDecodeFrames, VBEncodeFrames, VBRegionMask  # noqa: E402
from .loaders import VBContextWindows, VBLoadControlNet, VBLoadImageModel, VBLoadVideoModel  # noqa: E402

NODES = [VBLoadImageModel, VBLoadControlNet, VBLoadVideoModel, VBContextWindows, VBEncodeFrames, VBDecodeFrames,
         VBRegionMask, VBFramewiseGenerate, VBPrompt2PromptEdit,
         VBDDIMInvert, VBMixLatents, VBVideoDenoise, VBEncapsulatedT2V, VBEVSRefine,
         VBJVIDSample, VBTemporalLatentSmoothing,
         VBAnchorCandidates, VBSelectAnchor, VBStaticVideo, VBNIVSDS, VBI4VGen]


class VideoBridgeExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> VideoBridgeExtension:
    return VideoBridgeExtension()
