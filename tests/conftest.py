"""Test setup: import the pack as the package ``videobridge`` without running its ComfyUI entry point.

The repository root is the ComfyUI package (it has ``__init__.py``). ComfyUI imports it under its folder name; the
tests register the same folder as ``videobridge`` so ``videobridge.core`` and ``videobridge.nodes`` resolve with
their relative imports intact. The root ``__init__`` is not executed here; node tests load the entry point
themselves inside a real ComfyUI. The repository root is also put on ``sys.path`` for ``tools.*``.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if "videobridge" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("videobridge", os.path.join(ROOT, "__init__.py"),
                                                   submodule_search_locations=[ROOT])
    sys.modules["videobridge"] = importlib.util.module_from_spec(_spec)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
