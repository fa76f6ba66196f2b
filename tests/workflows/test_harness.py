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
