"""The single import of ComfyUI's node API: V3 schema from the pinned ``comfy_api.v0_0_2`` (ComfyUI >= 0.3.64).

Every other module imports ``io``, ``ui`` and ``ComfyExtension`` from here, so a version bump is a one-line change.
"""
from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
