#!/usr/bin/env python3
"""The main job: run one of the pack's workflows in a real ComfyUI, on a real video, and print the output file(s).

    python3 tools/run_workflow.py [WORKFLOW] [--input VIDEO] [--image PICTURE] [--output DIR]

WORKFLOW is a path, a file name in ``workflows/`` with or without ``.json`` (``bivdiff_ip2p_animatediff``; the list
is printed when the name is unknown) or a word matching one file name (``inpaint``); default: the BIVDiff ControlNet
+ ZeroScope workflow.
Without ``--input`` the input is a short real clip (a running fox, an animated preview shipped in the PyPI package
``comfyui-workflow-templates-media-video``, which ComfyUI itself installs), decoded to mp4 at run time.

On first use this sets up ComfyUI 0.3.75 from PyPI in a cache outside the repository (``tools/comfy_env.py``;
``$VIDEOBRIDGE_CACHE``, default ``~/.cache/comfyui-videobridge``) and re-executes itself with that Python.
With ``COMFYUI_DIR`` (and optionally ``COMFYUI_PYTHON``) it uses that ComfyUI install and its models instead.

Model files the workflow names that are missing get tiny random-weight stand-ins (``tools/standins.py``); the run
is then a smoke run of the graph, not a real result, and says so.

Runs with any python3 >= 3.10: only the standard library is imported before the re-exec.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Optional

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TOOLS)
WORKFLOWS = os.path.join(REPO_ROOT, "workflows")
DEFAULT_WORKFLOW = "bivdiff_controlnet_zeroscope"
IN_ENV = "VIDEOBRIDGE_RUN_IN_ENV"
STANDIN_REGISTRY = ".videobridge-standins.json"  # in a models dir: which files there are stand-ins

# Loader nodes of ComfyUI core whose combo values are model files (the pack's own loaders all start with "VB").
CORE_LOADERS = {"CheckpointLoaderSimple", "CheckpointLoader", "ControlNetLoader", "DiffControlNetLoader", "VAELoader",
                "CLIPLoader", "CLIPVisionLoader", "UNETLoader", "DiffusersLoader", "LoraLoader",
                "LoraLoaderModelOnly", "UpscaleModelLoader", "ImageOnlyCheckpointLoader"}
MODEL_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pt2", ".pkl", ".sft", ".gguf")

# Default clip: the first of these animated previews found in the templates media package.
DEFAULT_CLIPS = ("text_to_video_wan-1.webp", "image_to_video_wan-1.webp", "video_wan2_2_14B_t2v-1.webp")
MEDIA_MODULE = "comfyui_workflow_templates_media_video"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python3 tools/run_workflow.py",
        description="Run a ComfyUI-VideoBridge workflow in a real ComfyUI and print the output video path(s).")
    ap.add_argument("workflow", nargs="?", default=None,
                    help=f"workflow file name, word of a file name, or path (default: {DEFAULT_WORKFLOW})")
    ap.add_argument("--input", metavar="VIDEO", help="your own input video (default: a short real clip)")
    ap.add_argument("--image", metavar="PICTURE",
                    help="your own picture for workflows with a LoadImage node (image-to-video; default: the middle "
                         "frame of the input video)")
    ap.add_argument("--output", metavar="DIR", default=os.path.join(REPO_ROOT, "out"),
                    help="where ComfyUI writes the outputs (default: out/ in the repository, git-ignored)")
    ap.add_argument("--frames", type=int, default=16,
                    help="frames of the default clip (default 16, or the workflow's frame count if larger)")
    ap.add_argument("--width", type=int, default=448,
                    help="width of the default clip, rounded to a multiple of 64; height follows (default 448)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run (default 3600)")
    ap.add_argument("--thumbnail", metavar="JPG",
                    help="also save a thumbnail JPEG: the input and every stage output of the run, a row each")
    ap.add_argument("--keep", action="store_true", help="keep ComfyUI's temporary base directory and log")
    ap.add_argument("--no-import-check", action="store_true",
                    help="start even if the pack fails to import (debugging; its nodes are then missing)")
    return ap.parse_args(argv)


# ============================================================================ outside the environment (stdlib)
def reexec_in_env(argv: list, args) -> None:
    sys.path.insert(0, TOOLS)
    import comfy_env

    try:
        env = comfy_env.ensure_env(media=args.input is None)
    except comfy_env.EnvError as exc:
        print(f"error: setting up ComfyUI failed: {exc}", file=sys.stderr)
        sys.exit(1)
    child = env.child_env()
    child[IN_ENV] = "1"
    child["VIDEOBRIDGE_EXTERNAL_COMFYUI"] = "1" if env.external else ""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(env.python, [env.python, os.path.abspath(__file__)] + argv, child)


# ============================================================================ inside the environment
def say(msg: str = "") -> None:
    print(msg, flush=True)


def workflow_files() -> list:
    return sorted(os.path.join(WORKFLOWS, f) for f in os.listdir(WORKFLOWS) if f.endswith(".json")) \
        if os.path.isdir(WORKFLOWS) else []


def resolve_workflow(name: str | None) -> tuple:
    """(path, UI workflow dict) of a workflow: a path, a file name in ``workflows/`` with or without ``.json``
    (``bivdiff_ip2p_animatediff``) or a word that matches exactly one file name (``"inpaint"``); None is the
    default workflow."""
    name = name or DEFAULT_WORKFLOW
    candidates = [name, os.path.join(WORKFLOWS, name), os.path.join(WORKFLOWS, name + ".json")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    files = workflow_files()
    if path is None:
        hits = [p for p in files if name.lower() in os.path.basename(p).lower()]
        path = hits[0] if len(hits) == 1 else None
    if path is None:
        listing = "\n  ".join(os.path.basename(p)[:-5] for p in files) or "none"
        raise SystemExit(f"error: workflow {name!r} not found or not unique (looked in {WORKFLOWS}); "
                         f"available:\n  {listing}")
    with open(path, "r", encoding="utf-8") as fh:
        ui = json.load(fh)
    if "nodes" not in ui:
        raise SystemExit(f"error: {path} is not a UI-format workflow (no 'nodes'); save it from ComfyUI with "
                         "Workflow > Save, not 'Export (API)'")
    return path, ui


def referenced_model_values(ui: dict) -> list:
    """String widget values of the pack's loader nodes (type ``VB*``) and ComfyUI's core loaders."""
    out = []
    for n in ui.get("nodes", []):
        typ = str(n.get("type", ""))
        if n.get("mode") in (2, 4) or not (typ.startswith("VB") or typ in CORE_LOADERS):
            continue  # muted / bypassed nodes do not run
        vals = n.get("widgets_values")
        vals = vals.values() if isinstance(vals, dict) else (vals or [])
        out.extend((typ, v) for v in vals if isinstance(v, str) and v)
    return out


def _exists_model(roots: list, rel: str) -> bool:
    return any(os.path.exists(os.path.join(r, rel)) for r in roots)


def _find_anywhere(roots: list, value: str) -> bool:
    """Is ``value`` a file/folder under some ``<root>/<key>/`` (or ``<root>/<value>`` for 'diffusers/x')?"""
    for r in roots:
        if os.path.exists(os.path.join(r, value)):
            return True
        with_keys = [d for d in (os.listdir(r) if os.path.isdir(r) else []) if os.path.isdir(os.path.join(r, d))]
        if any(os.path.exists(os.path.join(r, k, value)) for k in with_keys):
            return True
    return False


def plan_models(ui: dict, model_roots: list) -> tuple:
    """Match the workflow's loader values against the stand-in catalogue and the model folders.

    Returns (missing {role: rel}, standard {value: rel} referenced, unknown [values that look like model files but
    exist nowhere]).
    """
    from tools.standins import STANDIN_FILES

    by_value = {}
    for role, rel in STANDIN_FILES.items():
        by_value[rel] = (role, rel)                     # "diffusers/zeroscope_v2_576w" (the VB combo value)
        by_value[rel.split("/", 1)[1]] = (role, rel)    # "v1-5-pruned-emaonly.safetensors"
    missing, referenced, unknown = {}, {}, []
    for typ, value in referenced_model_values(ui):
        if value in by_value:
            role, rel = by_value[value]
            referenced[value] = rel
            if not _exists_model(model_roots, rel):
                missing[role] = rel
        elif value.lower().endswith(MODEL_EXTS) and not _find_anywhere(model_roots, value):
            unknown.append(f"{value} ({typ})")
    return missing, referenced, unknown


def _load_registry(models_dir: str) -> set:
    try:
        with open(os.path.join(models_dir, STANDIN_REGISTRY), "r", encoding="utf-8") as fh:
            return set(json.load(fh))
    except (OSError, ValueError):
        return set()


def _save_registry(models_dir: str, rels: set) -> None:
    with open(os.path.join(models_dir, STANDIN_REGISTRY), "w", encoding="utf-8") as fh:
        json.dump(sorted(rels), fh, indent=1)


def prepare_models(ui: dict, cache: str, external: bool, comfy_dir: str) -> tuple:
    """Decide the models dir(s) and create stand-ins for missing files. Returns (models_dir, extra_dirs, notes)."""
    if external:
        models_dir = os.path.join(comfy_dir, "models")
        standin_dir = os.path.join(cache, "standin-models")  # never write random weights into the user's folder
        extra = [standin_dir]
    else:
        models_dir = os.path.join(cache, "models")
        standin_dir, extra = models_dir, []
    os.makedirs(standin_dir, exist_ok=True)
    roots = [models_dir] + extra
    missing, referenced, unknown = plan_models(ui, roots)
    if unknown:
        say("WARNING: the workflow names model files found in no model folder (ComfyUI will reject them): "
            + ", ".join(unknown))
    registry = _load_registry(standin_dir)
    if missing:
        from tools.standins import ensure_standins

        say("Creating tiny random-weight stand-ins for: " + ", ".join(sorted(missing.values()))
            + f" (in {standin_dir}) ...")
        t0 = time.monotonic()
        created = ensure_standins(standin_dir, missing)
        registry |= {os.path.relpath(p, standin_dir).replace(os.sep, "/") for p in created}
        _save_registry(standin_dir, registry)
        say(f"  done in {time.monotonic() - t0:.0f}s")

    def is_standin(rel):  # the file ComfyUI will find first is one we generated
        if standin_dir != models_dir and os.path.exists(os.path.join(models_dir, rel)):
            return False
        return rel in registry and os.path.exists(os.path.join(standin_dir, rel))

    return models_dir, extra, sorted({rel for rel in referenced.values() if is_standin(rel)})


def find_default_clip() -> str:
    import importlib.util

    spec = importlib.util.find_spec(MEDIA_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the package {MEDIA_MODULE} is not installed; pass --input VIDEO")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "templates")
    for name in DEFAULT_CLIPS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise SystemExit(f"error: none of {', '.join(DEFAULT_CLIPS)} in {folder}; pass --input VIDEO")


def decode_default_clip(dest: str, frames: int, width: int, fps: float = 16.0) -> str:
    """Decode the animated preview to mp4: ``frames`` frames (forward, then back and forth when it has fewer),
    scaled and centre-cropped to multiples of 64."""
    import numpy as np
    from PIL import Image

    from tools.comfy_server import write_video

    src = find_default_clip()
    im = Image.open(src)
    total = getattr(im, "n_frames", 1)
    order = list(range(total)) + list(range(total - 2, 0, -1))          # ping-pong when more frames are wanted
    order = [order[i % len(order)] for i in range(frames)] if total > 1 else [0] * frames
    n = len(order)
    w64 = max(64, int(round(width / 64)) * 64)
    scale = w64 / im.width
    h_scaled = max(64, int(round(im.height * scale)))
    h64 = max(64, (h_scaled // 64) * 64)
    out = []
    for i in order:
        im.seek(i)
        fr = im.convert("RGB").resize((w64, h_scaled), Image.LANCZOS)
        top = (h_scaled - h64) // 2
        out.append(np.asarray(fr.crop((0, top, w64, top + h64))))
    write_video(dest, np.stack(out), fps=fps)
    say(f"Input: {n} frames {w64}x{h64} @ {fps:g} fps from {os.path.basename(src)} "
        f"(package {MEDIA_MODULE}{'; played forward and back' if n > total else ''}) -> {dest}")
    return dest


class Progress:
    """Prints which node runs and its step progress from ComfyUI's websocket messages."""

    def __init__(self, api: dict):
        self.api = api
        self.tty = sys.stdout.isatty()
        self.last_pct = {}
        self.t0 = time.monotonic()
        self.open_line = False

    def _node(self, nid) -> str:
        node = self.api.get(str(nid), {})
        title = (node.get("_meta") or {}).get("title")
        cls = node.get("class_type", "?")
        return f"#{nid} {cls}" + (f" ({title})" if title and title != cls else "")

    def _end_line(self):
        if self.open_line:
            print(flush=True)
            self.open_line = False

    def __call__(self, msg: dict) -> None:
        typ, data = msg.get("type"), msg.get("data") or {}
        t = time.monotonic() - self.t0
        if typ == "execution_cached" and data.get("nodes"):
            say(f"  [{t:6.1f}s] cached: {', '.join(map(str, data['nodes']))}")
        elif typ == "executing" and data.get("node") is not None:
            self._end_line()
            say(f"  [{t:6.1f}s] running {self._node(data['node'])}")
        elif typ == "progress":
            value, total = int(data.get("value", 0)), max(1, int(data.get("max", 1)))
            if self.tty:
                print(f"\r      step {value}/{total}", end="", flush=True)
                self.open_line = value < total
                if value >= total:
                    print(flush=True)
            else:
                pct = 100 * value // total
                key = data.get("node")
                if value == total or pct >= self.last_pct.get(key, -100) + 10:
                    self.last_pct[key] = pct
                    say(f"      step {value}/{total}")
        elif typ in ("execution_success", "execution_error", "execution_interrupted"):
            self._end_line()


def run_in_env(args) -> int:
    sys.path.insert(0, REPO_ROOT)
    from tools.comfy_server import (ComfyError, ComfyServer, PromptFailed, PromptRejected, set_input_image,
                                    set_input_video, write_still)

    comfy_dir = os.environ["VIDEOBRIDGE_COMFYUI"]
    cache = os.environ.get("VIDEOBRIDGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                "comfyui-videobridge")
    external = bool(os.environ.get("VIDEOBRIDGE_EXTERNAL_COMFYUI"))
    wf_path, ui = resolve_workflow(args.workflow)
    say(f"Workflow: {wf_path}")
    say(f"ComfyUI: {comfy_dir}" + (" (external, COMFYUI_DIR)" if external else ""))

    models_dir, extra_dirs, standins = prepare_models(ui, cache, external, comfy_dir)
    say(f"Models: {models_dir}" + (f" (+ stand-ins in {', '.join(extra_dirs)})" if extra_dirs else ""))
    if args.input and not os.path.isfile(args.input):
        say(f"error: input video {args.input} not found")
        return 1
    if args.image and not os.path.isfile(args.image):
        say(f"error: input picture {args.image} not found")
        return 1
    output_dir = os.path.abspath(args.output)
    os.makedirs(output_dir, exist_ok=True)

    t_start = time.monotonic()
    srv = ComfyServer(comfy_dir, python=sys.executable, models_dir=models_dir, extra_model_dirs=extra_dirs,
                      output_dir=output_dir, cpu=None, check_imports=not args.no_import_check,
                      keep_base=args.keep, startup_timeout=600, create_model_folders=not external,
                      standins=bool(standins))
    try:
        if args.input:
            name = os.path.basename(args.input)
            shutil.copyfile(args.input, srv.input_path(name))
            say(f"Input: {args.input}")
        else:
            name = "videobridge_default_clip.mp4"
            wanted = [n.get("widgets_values", [0, 0])[1] for n in ui.get("nodes", []) if n.get("type") == "ImageFromBatch"]
            decode_default_clip(srv.input_path(name), max([args.frames] + [int(v) for v in wanted]), args.width)
        say("Starting ComfyUI ...")
        with srv:
            say(f"  ready in {time.monotonic() - t_start:.1f}s at {srv.url} (log: {srv.log_path})")
            api = srv.convert(ui)
            loaders = set_input_video(api, name)
            still = None
            if any(n.get("class_type") == "LoadImage" for n in api.values()):
                if args.image:
                    still = os.path.basename(args.image)
                    shutil.copyfile(args.image, srv.input_path(still))
                else:
                    still = os.path.splitext(name)[0] + "_still.png"
                    write_still(srv.input_path(name), srv.input_path(still))
                set_input_image(api, still)
                say(f"Input picture: {args.image or 'the middle frame of the input video'}")
            elif not loaders:
                say("NOTE: the workflow has no LoadVideo node (text-to-video); the input video is not used")
            progress = Progress(api)
            t_run = time.monotonic()
            prompt_id = srv.post(api, ui_workflow=ui)
            say(f"Running prompt {prompt_id} ...")
            try:
                entry = srv.wait(prompt_id, timeout=args.timeout, on_event=progress, check=True)
            except KeyboardInterrupt:
                say("\nInterrupted: asking ComfyUI to stop ...")
                srv.interrupt()
                return 130
            except TimeoutError as exc:
                srv.interrupt()
                say(f"error: {exc}")
                return 1
            outputs = srv.output_paths(entry)
            say(f"Finished in {time.monotonic() - t_run:.1f}s.")
            rows = None
            if args.thumbnail:                   # while the server's input and temp folders still exist
                has_video = any(n.get("class_type") == "LoadVideo" for n in api.values())
                try:
                    rows = thumbnail_rows(ui, entry, lambda nid: srv.output_paths(entry, nid),
                                          srv.input_path(name) if has_video else None,
                                          srv.input_path(still) if still else None)
                except ValueError as exc:
                    say(f"error: --thumbnail: {exc}")
                    return 1
    except PromptRejected as exc:
        say(f"error: ComfyUI rejected the workflow:\n{exc}")
        return 1
    except PromptFailed as exc:
        say(f"error: the workflow failed in ComfyUI:\n{exc}")
        if args.keep:
            say(f"ComfyUI log: {srv.log_path}")
        return 1
    except ComfyError as exc:
        say(f"error: {exc}")
        return 1
    if args.keep:
        say(f"Kept ComfyUI base directory {srv.base_dir}")
    videos = [p for p in outputs if p.lower().endswith((".mp4", ".webm", ".webp", ".gif", ".mov", ".mkv"))]
    if not outputs:
        say("error: the workflow finished but reported no output files")
        return 1
    say("Output file(s):")
    for p in videos or outputs:
        say(f"  {p}")
    if rows:
        if standins:                             # every output row says what it is
            rows = [(t if t.startswith("input") else f"{t}: stand-in models", f) for t, f in rows]
        write_thumbnail(rows, args.thumbnail,
                        label="stand-in random-weight models: a smoke run, not a real result" if standins else None)
        say(f"Thumbnail: {args.thumbnail}")
    if standins:
        say("NOTE: stand-in random-weight models were created for: " + ", ".join(standins)
            + "; the output is a smoke run of the graph, not a real result. For a real result put the real "
            f"files at those paths under {models_dir} (see the README).")
    return 0


def thumbnail_rows(ui: dict, entry: dict, output_paths, input_video: Optional[str],
                   input_image: Optional[str]) -> list:
    """What a workflow's thumbnail shows, top to bottom: ``[(label, frames)]`` with frames as PIL images: the input
    (the clip's first frames, or the picture), then every saved or previewed stage output in graph order (an animated
    WEBP, or a single previewed image such as an I4VGen anchor; multi-image previews are left out), then the output
    video. ``output_paths(node_id)`` lists a node's output files."""
    from PIL import Image
    from tools.comfy_server import read_video

    rows, final = [], None
    by_id = {str(n["id"]): n for n in ui.get("nodes", [])}
    outputs = entry.get("outputs") or {}
    for nid in sorted(outputs, key=lambda k: int(k) if str(k).isdigit() else 0):
        node = by_id.get(str(nid), {})
        title = node.get("title") or node.get("type", "output")
        files = output_paths(nid)
        videos = [f for f in files if f.lower().endswith(".mp4")]
        webps = [f for f in files if f.lower().endswith(".webp")]
        pngs = [f for f in files if f.lower().endswith(".png")]
        if videos:
            final = (title, [Image.fromarray(f) for f in read_video(videos[0])])
        elif webps:
            with Image.open(webps[0]) as im:
                frames = []
                for k in range(getattr(im, "n_frames", 1)):
                    im.seek(k)
                    frames.append(im.convert("RGB"))
            rows.append((title, frames))
        elif len(pngs) == 1:
            rows.append((title, [Image.open(pngs[0]).convert("RGB")]))
    if final is None:
        raise ValueError("the run saved no video (SaveVideo), so there is nothing to show")
    n = len(final[1])
    if input_image:
        rows.insert(0, ("input picture", [Image.open(input_image).convert("RGB")]))
    elif input_video:
        rows.insert(0, ("input video", [Image.fromarray(f) for f in read_video(input_video)[:n]]))
    if not rows:                                 # text-to-video with nothing else to show: the video on two rows
        half = max(1, n // 2)
        return [(final[0], final[1][:half]), (final[0] + " (continued)", final[1][half:] or final[1][-1:])]
    return rows + [final]


def write_thumbnail(rows: list, dest: str, cell: int = 170, label: Optional[str] = None) -> None:
    """The workflow's thumbnail as a JPEG (ComfyUI shows ``<workflow>.jpg`` in its template browser): one row per
    ``(label, frames)`` of :func:`thumbnail_rows`, three evenly spaced frames each (a single image once), each row's
    label on a dark strip. ``label`` is written across the last row on a dark band (stand-in smoke runs, so that a
    thumbnail never shows unlabelled noise)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    cols = 3
    grid = Image.new("RGB", (cols * cell, len(rows) * cell), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    small = ImageFont.load_default(size=max(10, cell // 11))
    for r, (title, frames) in enumerate(rows):
        picks = [frames[0]] if len(frames) == 1 else \
            [frames[round(i * (len(frames) - 1) / (cols - 1))] for i in range(cols)]
        for c, f in enumerate(picks):
            grid.paste(ImageOps.fit(f, (cell, cell)), (c * cell, r * cell))
        box = draw.textbbox((6, r * cell + 4), title, font=small)
        draw.rectangle((0, r * cell, box[2] + 6, box[3] + 4), fill=(20, 20, 20))
        draw.text((6, r * cell + 4), title, fill=(235, 235, 235), font=small)
    if label:
        W, H = grid.size
        font = ImageFont.load_default(size=max(12, W // 26))
        width = draw.textlength(label, font=font)
        if width > W - 20:
            font = ImageFont.load_default(size=max(8, int(font.size * (W - 20) / width)))
        y = H - cell // 2                        # across the last row: the output the stand-ins made
        box = draw.textbbox((W // 2, y), label, font=font, anchor="mm")
        draw.rectangle((0, box[1] - 8, W, box[3] + 8), fill=(20, 20, 20))
        draw.text((W // 2, y), label, fill=(255, 220, 120), font=font, anchor="mm")
    grid.save(dest, quality=85)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not os.environ.get(IN_ENV):
        reexec_in_env(argv, args)  # does not return
    return run_in_env(args)


if __name__ == "__main__":
    sys.exit(main())
