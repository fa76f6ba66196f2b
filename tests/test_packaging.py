"""Packaging rules users and the Comfy Registry rely on (COMFYUI.md §2, §11; MODELS.md §1)."""
import ast
import glob
import json
import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_PY = [p for d in ("core", "nodes") for p in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)] + \
    [os.path.join(ROOT, "__init__.py")]


def test_pyproject_and_requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert meta["tool"]["comfy"]["requires-comfyui"] == ">=0.3.64"
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        reqs = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    assert sorted(reqs) == sorted(meta["project"]["dependencies"])
    for r in reqs:
        assert not re.match(r"^(torch|torchvision|torchaudio)\b", r), "ComfyUI owns torch"
        assert "==" not in r, f"pin {r}: lower bounds only"


def test_no_eval_exec_and_no_v1_mappings():
    for path in PACK_PY:
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{path}: {node.func.id}() (ruff S102/S307)"
            if isinstance(node, ast.Name) and node.id in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
                raise AssertionError(f"{path}: V1 mappings would hide comfy_entrypoint")


def test_core_never_imports_comfyui_and_hub_calls_are_local():
    for path in PACK_PY:
        src = open(path).read()
        tree = ast.parse(src, path)
        if os.sep + "core" + os.sep in path:
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                for n in names:
                    assert n.split(".")[0] not in ("comfy", "comfy_api", "comfy_execution", "folder_paths",
                                                   "nodes", "server", "latent_preview"), f"{path} imports {n}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("from_pretrained", "from_single_file"):
                kws = {k.arg: k.value for k in node.keywords}
                ok = "local_files_only" in kws or any(k.arg is None for k in node.keywords)
                assert ok, f"{path}:{node.lineno} {node.func.attr} without local_files_only"
            if isinstance(node, ast.Name) and node.id in ("hf_hub_download", "snapshot_download"):
                raise AssertionError(f"{path}: {node.id}: no downloads")


def test_workflows_are_ui_format():
    for path in glob.glob(os.path.join(ROOT, "workflows", "*.json")):
        with open(path) as f:
            wf = json.load(f)
        assert {"nodes", "links", "version"} <= set(wf), path
        assert all(n["type"] for n in wf["nodes"])
