"""Workflow tests against ONE real ComfyUI server per test session (COMFYUI.md §13 tier 3, §14).

``python3 tools/run_tests.py`` builds the environment and runs pytest with ``VIDEOBRIDGE_COMFYUI`` set. Without it
the fixture falls back to the cached environment of ``tools/comfy_env.py`` if one exists, and otherwise skips the
workflow tests (under CI, ``CI`` set, it fails instead: a CI run must never skip them silently).

Fixtures:
- ``comfy``: a started :class:`tools.comfy_server.ComfyServer` with the pack linked in; its models folder holds the
  standard stand-ins of ``tools/standins.py`` (cached per version of that file), its input folder a synthetic clip
  (``comfy.test_clip``, ``comfy.test_clip_frames`` frames of ``comfy.test_clip_size`` (H, W)) and its middle frame
  as a picture (``comfy.test_image``). The server starts even
  if the pack fails to import, so that ``test_pack_imports`` can report it as one clear failure
  (``comfy.import_failures()``).
- ``run_ui``: ``run_ui(ui_workflow, models=None, video=None, timeout=600) -> (entry, api)``: convert, set the model
  names / input video, post and wait for success.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.comfy_server import (ComfyServer, set_input_image, set_input_video, set_model_names,  # noqa: E402
                                synthetic_clip, write_still, write_video)

TEST_CLIP = "videobridge_test_clip.mp4"
TEST_IMAGE = "videobridge_test_still.png"
TEST_CLIP_FRAMES = 8
TEST_CLIP_SIZE = (64, 64)  # (H, W)
TEST_CLIP_FPS = 8


def _cache_dir() -> str:
    return os.environ.get("VIDEOBRIDGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "comfyui-videobridge")


def _locate_comfy():
    """(comfy_dir, python) from VIDEOBRIDGE_COMFYUI, else from the cached venv's stamp; (None, None) if none."""
    comfy = os.environ.get("VIDEOBRIDGE_COMFYUI")
    if comfy:
        return comfy, os.environ.get("COMFYUI_PYTHON") or sys.executable
    venv = os.path.join(_cache_dir(), "venv")
    try:
        with open(os.path.join(venv, ".videobridge-stamp.json")) as fh:
            comfy = json.load(fh).get("comfy_dir")
    except (OSError, ValueError):
        return None, None
    py = os.path.join(venv, "bin", "python")
    if comfy and os.path.isfile(os.path.join(comfy, "main.py")) and os.path.isfile(py):
        return comfy, py
    return None, None


def _standin_models_dir(python):
    """A persistent models dir with the standard stand-ins, keyed by the content of tools/standins.py.

    Written by ``tools/standins.py`` run with ComfyUI's Python (which has torch and diffusers).
    """
    src = os.path.join(ROOT, "tools", "standins.py")
    with open(src, "rb") as fh:
        key = hashlib.sha256(fh.read()).hexdigest()[:12]
    base = os.path.join(_cache_dir(), "test-models")
    os.makedirs(base, exist_ok=True)
    for old in os.listdir(base):  # drop stand-ins written by older versions of standins.py
        if old != key and not old.startswith("."):
            shutil.rmtree(os.path.join(base, old), ignore_errors=True)
    path = os.path.join(base, key)
    out = subprocess.run([python, src, path], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"tools/standins.py {path} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return path


@pytest.fixture(scope="session")
def comfy():
    comfy_dir, python = _locate_comfy()
    if comfy_dir is None:
        msg = ("no ComfyUI found: run the tests with `python3 tools/run_tests.py` (it sets up ComfyUI 0.3.75 "
               "and sets VIDEOBRIDGE_COMFYUI)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    models_dir = _standin_models_dir(python)
    srv = ComfyServer(comfy_dir, python=python, models_dir=models_dir, cpu=True, check_imports=False, standins=True)
    h, w = TEST_CLIP_SIZE
    write_video(srv.input_path(TEST_CLIP), synthetic_clip(TEST_CLIP_FRAMES, h, w), fps=TEST_CLIP_FPS)
    write_still(srv.input_path(TEST_CLIP), srv.input_path(TEST_IMAGE))
    srv.test_clip, srv.test_clip_frames, srv.test_clip_size = TEST_CLIP, TEST_CLIP_FRAMES, TEST_CLIP_SIZE
    srv.test_image = TEST_IMAGE
    with srv:
        yield srv


@pytest.fixture
def run_ui(comfy):
    def run(ui_workflow, models=None, video=None, timeout=600):
        api = comfy.convert(ui_workflow)
        if models:
            set_model_names(api, models)
        set_input_video(api, video or comfy.test_clip)
        set_input_image(api, comfy.test_image)
        entry = comfy.run(api, timeout=timeout, ui_workflow=ui_workflow if isinstance(ui_workflow, dict) else None)
        return entry, api
    return run
