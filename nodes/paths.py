"""Model folders: ComfyUI's own keys through ``folder_paths`` (COMFYUI.md §6). Nothing is ever downloaded.

- ``checkpoints``: SD1.5 / inpainting / InstructPix2Pix single files
- ``diffusers``: diffusers folders (SD1.5 family, ZeroScope/ModelScope)
- ``controlnet``: ControlNet v1.1
- ``animatediff_models``: AnimateDiff motion modules, shared with AnimateDiff-Evolved (registered here if absent,
  with the standard model extensions so stray text files are not listed)
"""
import os

import folder_paths

from ..core.models import list_diffusers_folders

DIFFUSERS_PREFIX = "diffusers/"
MOTION_KEY = "animatediff_models"


def register_animatediff_folder() -> None:
    folder_paths.add_model_folder_path(MOTION_KEY, os.path.join(folder_paths.models_dir, MOTION_KEY))
    paths, exts = folder_paths.folder_names_and_paths[MOTION_KEY]
    folder_paths.folder_names_and_paths[MOTION_KEY] = (paths, set(exts) | set(folder_paths.supported_pt_extensions))


def diffusers_folders(unet_class=None) -> list:
    """Sub-folders (relative names) of every ``diffusers`` root that hold a diffusers model."""
    roots = folder_paths.get_folder_paths("diffusers")
    out = []
    for folder in list_diffusers_folders(roots, unet_class):
        root = next(r for r in roots if os.path.abspath(folder).startswith(os.path.abspath(r)))
        out.append(DIFFUSERS_PREFIX + os.path.relpath(folder, root).replace(os.sep, "/"))
    return sorted(out)


def files(key: str) -> list:
    try:
        return sorted(folder_paths.get_filename_list(key))
    except KeyError:
        return []


def resolve(key: str, name: str, node: str) -> str:
    """Full path of ``name`` (a file under ``key``, or ``diffusers/<folder>``); FileNotFoundError names both."""
    if name.startswith(DIFFUSERS_PREFIX):
        rel = name[len(DIFFUSERS_PREFIX):]
        for root in folder_paths.get_folder_paths("diffusers"):
            path = os.path.join(root, rel)
            if os.path.isfile(os.path.join(path, "model_index.json")):
                return path
        raise FileNotFoundError(f"{node}: diffusers folder '{rel}' with a model_index.json was not found in "
                                f"models/diffusers ({', '.join(folder_paths.get_folder_paths('diffusers'))})")
    path = folder_paths.get_full_path(key, name)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{node}: model '{name}' was not found in the '{key}' folder "
                                f"({', '.join(folder_paths.get_folder_paths(key))})")
    return path


def mtime(path: str) -> float:
    if os.path.isdir(path):
        return max((os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs), default=0.0)
    return os.path.getmtime(path)
