"""In-process node tests against the real ComfyUI modules (COMFYUI.md §13 tier 2).

``VIDEOBRIDGE_COMFYUI`` (set by tools/run_tests.py) points at a real ComfyUI tree; without it these tests skip.
ComfyUI is put on sys.path with ``--cpu`` set before ``comfy.model_management`` is imported; model folders point
at a temporary directory filled with tiny random-weight stand-ins in the users' real file layouts.
"""
import importlib
import os
import sys

import pytest

COMFY = os.environ.get("VIDEOBRIDGE_COMFYUI")


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory):
    if not COMFY or not os.path.isdir(COMFY):
        pytest.skip("VIDEOBRIDGE_COMFYUI is not set: run the tests through tools/run_tests.py")
    if COMFY in sys.path:                     # ahead of the repository root, whose nodes/ would shadow ComfyUI's nodes.py
        sys.path.remove(COMFY)
    sys.path.insert(0, COMFY)
    import comfy.cli_args
    if os.environ.get("VIDEOBRIDGE_TEST_GPU") == "1":       # a GPU check (benchmarks/README.md): ComfyUI on the GPU,
        comfy.cli_args.args.force_fp32 = True               # fp32 weights and no TF32, so the tests' fp32
        import torch                                        # tolerances still hold
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    elif os.environ.get("VIDEOBRIDGE_TEST_GPU") != "fp16":  # "fp16": ComfyUI's own GPU defaults (only errors other
        comfy.cli_args.args.cpu = True                      # than tolerances mean something then)
    import folder_paths
    from tools.standins import ensure_standins

    models = tmp_path_factory.mktemp("models")
    for key in ("checkpoints", "controlnet", "diffusers", "animatediff_models", "t2i_adapter", "loras"):
        os.makedirs(models / key, exist_ok=True)
        folder_paths.add_model_folder_path(key if key != "t2i_adapter" else "controlnet", str(models / key),
                                           is_default=key != "t2i_adapter")
    ensure_standins(str(models))
    nodes = importlib.import_module("videobridge.nodes")
    return {n.__name__: n for n in nodes.NODES}, str(models)


@pytest.fixture(scope="module")
def N(comfy_env):
    """The pack's node classes by id."""
    return comfy_env[0]


@pytest.fixture(scope="module")
def base(N):
    """The SD1.5 stand-in loaded by VBLoadImageModel."""
    import torch

    with torch.inference_mode():
        return N["VBLoadImageModel"].execute(model_name="v1-5-pruned-emaonly.safetensors", dtype="auto",
                                             vae_dtype="auto").result[0]


@pytest.fixture(scope="module")
def native_sd15(comfy_env):
    """The full-attention SD1.5 stand-in (``dreamshaper_8.safetensors``) loaded by ComfyUI's own
    CheckpointLoaderSimple: (MODEL, CLIP, VAE). ComfyUI detects SD1.5 by its real widths, so
    ``tools.standins.teach_comfyui`` first teaches it the stand-in widths (as ``tools/comfy_standins`` does in a
    server)."""
    import nodes
    from tools.standins import teach_comfyui

    teach_comfyui()
    return nodes.CheckpointLoaderSimple().load_checkpoint("dreamshaper_8.safetensors")[:3]


if os.environ.get("VIDEOBRIDGE_TEST_GPU") in ("1", "fp16"):
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(item):
        """On the GPU check, fixtures and tests run under torch.inference_mode, as ComfyUI runs every node: tensors
        made in it (weights moved to the GPU included) cannot be used outside it."""
        import torch
        with torch.inference_mode():
            yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        import torch
        with torch.inference_mode():
            yield
