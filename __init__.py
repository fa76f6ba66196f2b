"""ComfyUI-VideoBridge: training-free image+video diffusion methods as ComfyUI nodes.

ComfyUI imports this package and calls ``comfy_entrypoint``. The engine in ``core/`` never needs ComfyUI, so the
node layer is only imported when ComfyUI's API is present; inside ComfyUI any import error surfaces as a real
``IMPORT FAILED`` line instead of being hidden.
"""
import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
