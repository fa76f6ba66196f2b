#!/usr/bin/env python3
"""Run the test suite against a real ComfyUI: ``python3 tools/run_tests.py [pytest args ...]``.

Sets up (first run, a few minutes) or reuses the ComfyUI 0.3.75 environment of ``tools/comfy_env.py`` in a cache
outside the repository, then runs ``<env python> -m pytest`` in the repository root with ``VIDEOBRIDGE_COMFYUI``
pointing at ComfyUI, passing every argument through, and exits with pytest's exit code.
With ``COMFYUI_DIR`` set, that ComfyUI install (and ``COMFYUI_PYTHON``) is used instead.

Runs with any python3 >= 3.10 (standard library only).
"""
import os
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TOOLS)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, TOOLS)
    import comfy_env

    try:
        env = comfy_env.ensure_env()
    except comfy_env.EnvError as exc:
        print(f"error: setting up ComfyUI failed: {exc}", file=sys.stderr)
        return 1
    os.chdir(REPO_ROOT)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(env.python, [env.python, "-m", "pytest"] + list(argv), env.child_env())
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
