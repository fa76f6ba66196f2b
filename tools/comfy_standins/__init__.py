"""A test-only ComfyUI custom node with no nodes: it teaches ComfyUI's model detection the widths of the tiny
stand-in checkpoints (``tools.standins.teach_comfyui``), so CheckpointLoaderSimple, LoraLoader, CLIPTextEncode,
ControlNetLoader and the core VAE nodes load them as they load real SD1.5 files. ``tools/comfy_server.py`` links it
into a server's ``custom_nodes`` for stand-in runs (the tests, the main job on stand-ins); it is never part of the
pack a user installs, and real model files never match the stand-in widths."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # through the link
if _ROOT not in sys.path:
    sys.path.append(_ROOT)                    # last: ComfyUI's own top-level modules (nodes.py) stay first

from tools.standins import teach_comfyui  # noqa: E402

teach_comfyui()
NODE_CLASS_MAPPINGS = {}
