"""The real-ComfyUI harness itself: a core-nodes video workflow round trip, error reporting, and the pack's import."""
import os

import pytest

from tools.comfy_server import PACK_LINK_NAME, PromptRejected, read_video, set_input_video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def core_video_workflow(prefix="videobridge_test/roundtrip"):
    """UI format (as the browser saves it): LoadVideo -> GetVideoComponents -> CreateVideo (fps linked) -> SaveVideo."""
    return {
        "last_node_id": 4, "last_link_id": 4, "groups": [], "config": {}, "extra": {}, "version": 0.4,
        "nodes": [
            {"id": 1, "type": "LoadVideo", "pos": [0, 0], "size": [300, 300], "flags": {}, "order": 0, "mode": 0,
             "inputs": [], "outputs": [{"name": "VIDEO", "type": "VIDEO", "links": [1]}],
             "properties": {"Node name for S&R": "LoadVideo"}, "widgets_values": ["placeholder.mp4", "image"]},
            {"id": 2, "type": "GetVideoComponents", "pos": [350, 0], "size": [250, 100], "flags": {}, "order": 1,
             "mode": 0, "inputs": [{"name": "video", "type": "VIDEO", "link": 1}],
             "outputs": [{"name": "images", "type": "IMAGE", "links": [2]},
                         {"name": "audio", "type": "AUDIO", "links": None},
                         {"name": "fps", "type": "FLOAT", "links": [3]}],
             "properties": {"Node name for S&R": "GetVideoComponents"}, "widgets_values": []},
            {"id": 3, "type": "CreateVideo", "pos": [650, 0], "size": [250, 100], "flags": {}, "order": 2, "mode": 0,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 2},
                        {"name": "audio", "type": "AUDIO", "link": None},
                        {"name": "fps", "type": "FLOAT", "widget": {"name": "fps"}, "link": 3}],
             "outputs": [{"name": "VIDEO", "type": "VIDEO", "links": [4]}],
             "properties": {"Node name for S&R": "CreateVideo"}, "widgets_values": [30]},
            {"id": 4, "type": "SaveVideo", "pos": [950, 0], "size": [300, 300], "flags": {}, "order": 3, "mode": 0,
             "inputs": [{"name": "video", "type": "VIDEO", "link": 4}], "outputs": [],
             "properties": {"Node name for S&R": "SaveVideo"}, "widgets_values": [prefix, "auto", "auto"]},
        ],
        "links": [[1, 1, 0, 2, 0, "VIDEO"], [2, 2, 0, 3, 0, "IMAGE"], [3, 2, 2, 3, 2, "FLOAT"],
                  [4, 3, 0, 4, 0, "VIDEO"]],
    }


def test_core_video_roundtrip(comfy, run_ui):
    entry, api = run_ui(core_video_workflow(), timeout=120)
    assert {n["class_type"] for n in api.values()} == {"LoadVideo", "GetVideoComponents", "CreateVideo", "SaveVideo"}
    assert api["3"]["inputs"]["fps"] == ["2", 2]  # the widget converted to an input stays a link
    paths = comfy.output_paths(entry)
    assert len(paths) == 1 and paths[0].endswith(".mp4"), entry["outputs"]
    assert os.path.isfile(paths[0])
    frames = read_video(paths[0])
    assert frames.shape == (comfy.test_clip_frames, *comfy.test_clip_size, 3)
    assert 0 < frames.mean() < 255


def test_invalid_input_is_rejected_with_node_errors(comfy):
    api = comfy.convert(core_video_workflow())
    set_input_video(api, "does_not_exist.mp4")
    with pytest.raises(PromptRejected) as info:
        comfy.post(api)
    assert "1" in info.value.node_errors
    assert info.value.node_errors["1"]["class_type"] == "LoadVideo"
    assert "does_not_exist.mp4" in str(info.value)


def test_pack_imports(comfy):
    assert comfy.import_failures() == [], "the pack failed to import:\n" + comfy.log_tail(60)
    info = comfy.object_info()
    assert "VBLoadImageModel" in info
    assert info["VBLoadImageModel"]["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"


def test_thumbnail_shows_the_input_then_each_stage_output_labelled(tmp_path):
    """Rows in graph order: the input clip, a saved stage WEBP, a single previewed image, the output video; multi-image
    previews are left out; the stand-in banner lies across the last row; no video -> a clear error."""
    import numpy as np
    from PIL import Image

    from tools.comfy_server import synthetic_clip, write_video
    from tools.run_workflow import thumbnail_rows, write_thumbnail

    clip = synthetic_clip(6, 32, 32)
    write_video(str(tmp_path / "in.mp4"), clip)
    write_video(str(tmp_path / "out.mp4"), 255 - clip)
    frames = [Image.fromarray(f) for f in clip]
    frames[0].save(tmp_path / "stage.webp", save_all=True, append_images=frames[1:])
    frames[2].save(tmp_path / "anchor.png")
    for k in range(3):
        frames[k].save(tmp_path / f"cand{k}.png")
    ui = {"nodes": [{"id": 5, "type": "SaveAnimatedWEBP", "title": "Frame-wise"},
                    {"id": 7, "type": "PreviewImage", "title": "Anchor"},
                    {"id": 6, "type": "PreviewImage", "title": "Candidates"},
                    {"id": 9, "type": "SaveVideo", "title": "Smoothed"}]}
    files = {"5": ["stage.webp"], "7": ["anchor.png"], "6": ["cand0.png", "cand1.png", "cand2.png"],
             "9": ["out.mp4"]}
    entry = {"outputs": {k: {} for k in files}}
    paths = lambda nid: [str(tmp_path / f) for f in files[str(nid)]]   # noqa: E731
    rows = thumbnail_rows(ui, entry, paths, str(tmp_path / "in.mp4"), None)
    assert [t for t, _ in rows] == ["input video", "Frame-wise", "Anchor", "Smoothed"]
    assert [len(f) for _, f in rows] == [6, 6, 1, 6]
    write_thumbnail(rows, str(tmp_path / "t.jpg"), cell=60, label="stand-in")
    im = np.asarray(Image.open(tmp_path / "t.jpg").convert("RGB")).astype(int)
    assert im.shape == (4 * 60, 3 * 60, 3)
    assert (np.abs(im[3 * 60 + 30, 1:5] - [20, 20, 20]) < 25).all()          # the banner across the last row
    assert np.abs(im[60 + 30, 100] - [20, 20, 20]).max() > 40                 # the stage row is visible
    assert (np.abs(im[2 * 60 + 30, 150] - [24, 24, 24]) < 25).all()           # the anchor is shown once
    with pytest.raises(ValueError, match="no video"):
        thumbnail_rows(ui, {"outputs": {"5": {}}}, paths, None, None)
