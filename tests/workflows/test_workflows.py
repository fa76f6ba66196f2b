"""Every workflow in workflows/ converted to API format and run in the real ComfyUI server on a real clip, with
the tiny stand-in models in its model folders; plus Cancel and bad input through the server."""
import glob
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from tools.comfy_server import (PromptRejected, execution_error, is_interrupted, read_video, set_input_image,
                                set_input_video)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))


def workflow_id(path):
    return os.path.basename(path)[:-5]


def by_id(wid):
    return os.path.join(ROOT, "workflows", wid + ".json")


STEPS = 3                                      # CI speed; everything else runs as shipped


def api_for(comfy, path, steps=STEPS):
    with open(path) as f:
        ui = json.load(f)
    api = comfy.convert(ui)
    for node in api.values():
        if node["class_type"].startswith("VB") and "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    set_input_video(api, comfy.test_clip)
    set_input_image(api, comfy.test_image)
    return ui, api


def test_every_workflow_has_a_thumbnail_and_a_title():
    """Each workflow has its .jpg (the template browser's thumbnail) and a title in its metadata naming the method
    (ComfyUI 0.3.75's template browser lists a custom node's templates by file name; newer frontends read titles)."""
    assert WORKFLOWS
    for path in WORKFLOWS:
        name = os.path.basename(path)[:-5]
        with open(path) as f:
            info = json.load(f)["extra"]["info"]
        assert os.path.isfile(path[:-5] + ".jpg"), f"{name} has no thumbnail"
        assert info["title"].split()[0].rstrip(":") in ("BIVDiff", "EVS", "JVID", "I4VGen")


TITLE = 30          # LiteGraph draws a node's title bar above its pos


def _box(node):
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE, x + w, y + h


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", WORKFLOWS, ids=workflow_id)
def test_workflow_layout_has_no_overlaps(path):
    """Nodes (title bars included, video previews grown) never overlap; groups never overlap and each node is wholly
    inside one group or outside all; a Note names every model file its loaders use and says stand-ins give noise."""
    with open(path) as f:
        ui = json.load(f)
    nodes = ui["nodes"]
    for n in nodes:
        if n["type"] in ("LoadVideo", "SaveVideo"):
            assert n["size"][1] >= 400, f"{n['type']} #{n['id']} leaves no room for its video preview"
    boxes = [(n["id"], _box(n)) for n in nodes]
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1:]:
            assert not _overlap(ba, bb), f"nodes #{a} and #{b} overlap"
    groups = [(g["title"], (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                            g["bounding"][1] + g["bounding"][3])) for g in ui.get("groups", [])]
    for i, (a, ga) in enumerate(groups):
        assert len(a) * 13 <= ga[2] - ga[0], f"group title {a!r} is wider than its group"     # ~13 px a char at 24
        for b, gb in groups[i + 1:]:
            assert not _overlap(ga, gb), f"groups {a!r} and {b!r} overlap"
    for nid, box in boxes:
        inside = [t for t, g in groups if g[0] <= box[0] and g[1] <= box[1] - 30 and box[2] <= g[2] and box[3] <= g[3]]
        touching = [t for t, g in groups if _overlap(g, box)]
        assert touching == inside and len(inside) <= 1, f"node #{nid} straddles groups {touching}"
    notes = [n for n in nodes if n["type"] == "Note"]
    assert notes, "the workflow has no Note saying what it does"
    text = " ".join(n["widgets_values"][0] for n in notes)
    assert "stand-in" in text, "the Note does not say that stand-in models give noise"
    for n in nodes:
        if n["type"].startswith("VBLoad"):
            assert n["widgets_values"][0] in text, f"the Note does not say where {n['widgets_values'][0]} goes"


def test_evs_workflow_explains_every_knob():
    path = by_id("evs_refine_animatediff_lightning")
    with open(path) as f:
        ui = json.load(f)
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    knobs = ["upscale", "s1", "t2i_steps", "cfg", "t_T2V", "t2v_steps", "t_V", "n_V", "t2v_cfg", "block", "renoise",
             "sfi_layers", "sfi_gamma", "frame_batch_size"]
    assert [k for k in knobs if k not in note] == []
    assert {g["title"].split(" · ")[0] for g in ui["groups"]} == {"1", "2", "3", "4"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=workflow_id)
def test_workflow_runs_on_a_real_clip(comfy, path):
    ui, api = api_for(comfy, path)
    # the size and frame count are set once: on the input stage, or on the sampler of a text-to-video graph
    size = next((n["inputs"] for n in api.values() if n["class_type"] == "ImageScale"), None) or \
        next(n["inputs"] for n in api.values() if {"width", "height"} <= set(n["inputs"]))
    cut = [n["inputs"]["length"] for n in api.values() if n["class_type"] == "ImageFromBatch"]
    frames = min(cut[0], comfy.test_clip_frames) if cut else \
        next(n["inputs"]["frames"] for n in api.values() if "frames" in n["inputs"])
    entry = comfy.run(api, timeout=1200, ui_workflow=ui)
    files = comfy.output_paths(entry)
    videos = [f for f in files if f.endswith(".mp4")]
    webps = [f for f in files if f.endswith(".webp")]
    assert videos, f"no video written; outputs: {files}"
    for v in videos:
        clip = np.asarray(read_video(v))
        assert clip.shape[0] == frames
        assert clip.shape[1:3] == (size["height"], size["width"])
        assert np.isfinite(clip.astype(np.float32)).all() and clip.std() > 0
    for w in webps:
        with Image.open(w) as im:
            assert getattr(im, "n_frames", 1) == frames
            assert im.size == (size["width"], size["height"])


def test_bad_widget_value_is_rejected_by_validation(comfy):
    _, api = api_for(comfy, WORKFLOWS[0])
    mix = next(n for n in api.values() if n["class_type"] == "VBMixLatents")
    mix["inputs"]["alpha"] = 1.5
    for key in [k for k, n in api.items() if n["class_type"] == "SaveAnimatedWEBP"]:
        del api[key]                       # otherwise ComfyUI runs the still-valid output branch and reports 200
    with pytest.raises(PromptRejected) as e:
        comfy.run(api, timeout=120)
    assert "value_bigger_than_max" in json.dumps(e.value.body)


def test_mismatched_mask_frames_fail_with_a_clear_error(comfy):
    path = by_id("bivdiff_inpaint_zeroscope")
    _, api = api_for(comfy, path)
    gen = next(k for k, n in api.items() if n["class_type"] == "VBFramewiseGenerate")
    src = api[gen]["inputs"]["images"]
    api["900"] = {"class_type": "ImageFromBatch", "inputs": {"image": src, "batch_index": 0, "length": 3}}
    api["901"] = {"class_type": "ImageToMask", "inputs": {"image": ["900", 0], "channel": "red"}}
    api[gen]["inputs"]["mask"] = ["901", 0]
    entry = comfy.wait(comfy.post(api), timeout=600)
    err = execution_error(entry)
    assert err and err["node_type"] == "VBFramewiseGenerate"
    assert "mask" in err["exception_message"] and "3 frames" in err["exception_message"]


def test_cancel_in_the_middle_of_sampling(comfy):
    path = by_id("bivdiff_controlnet_zeroscope")
    _, api = api_for(comfy, path, steps=400)
    seen = []

    def on_event(msg):
        if msg.get("type") == "progress" and msg["data"].get("value", 0) >= 2 and not seen:
            seen.append(msg["data"])
            comfy.interrupt()

    pid = comfy.post(api)
    start = time.monotonic()
    entry = comfy.wait(pid, timeout=900, on_event=on_event)
    assert seen, "no progress events were reported"
    assert is_interrupted(entry), entry.get("status")
    assert time.monotonic() - start < 600
    # the same graph runs to completion afterwards: nothing was left patched or half-loaded
    _, api = api_for(comfy, path, steps=2)
    assert comfy.run(api, timeout=900)["status"]["status_str"] == "success"


def test_evs_workflow_with_selective_feature_injection_then_without(comfy):
    """The EVS graph with the inversion + SFI block ('deep': the stand-ins have no full-resolution attention) runs in
    the server, gives another video than the SDEdit block, and the cached video model is left unpatched for the next
    prompt (the SDEdit run afterwards reproduces the first SDEdit run exactly)."""
    path = by_id("evs_refine_animatediff_lightning")

    def run(**refine):
        _, api = api_for(comfy, path)
        key = next(k for k, n in api.items() if n["class_type"] == "VBEVSRefine")
        api[key]["inputs"].update(t2i_steps=10, **refine)
        entry = comfy.run(api, timeout=900)
        cached = [m[1].get("nodes", []) for m in entry["status"]["messages"] if m[0] == "execution_cached"]
        assert key not in sum(cached, []), "VBEVSRefine was not executed again"
        return np.asarray(read_video(next(f for f in comfy.output_paths(entry) if f.endswith(".mp4"))))

    plain = run()
    sfi = run(block="inversion + SFI", sfi_layers="deep", sfi_gamma=0.8)
    assert sfi.shape == plain.shape and np.abs(sfi.astype(int) - plain.astype(int)).max() > 0
    assert np.array_equal(run(), plain)


def test_long_clip_workflow_runs_on_context_windows(comfy):
    """The long-clip graph with windows smaller than the test clip (4 frames, overlap 2 on 8): AnimateDiff smoothing
    runs window by window in the server, the whole clip comes out, and it differs from the run whose one window
    covers the clip (that one equals an unwindowed run bit for bit: tests/nodes/test_context_nodes.py)."""
    path = by_id("bivdiff_long_clip_animatediff")

    def run(**windows):
        _, api = api_for(comfy, path, steps=2)
        key = next(k for k, n in api.items() if n["class_type"] == "VBContextWindows")
        api[key]["inputs"].update(windows)
        entry = comfy.run(api, timeout=900)
        return np.asarray(read_video(next(f for f in comfy.output_paths(entry) if f.endswith(".mp4"))))

    small = run(context_length=4, context_overlap=2)
    assert small.shape[0] == comfy.test_clip_frames and np.isfinite(small.astype(np.float32)).all()
    whole = run(context_length=16, context_overlap=4)
    assert np.abs(small.astype(int) - whole.astype(int)).max() > 0
