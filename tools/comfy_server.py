"""Run a real ComfyUI server with this pack linked in, and talk to it (COMFYUI.md §14.2–§14.6).

Used by the workflow tests and by the main job (``tools/run_workflow.py``); runs inside the environment's Python
(the one ComfyUI runs with) but needs nothing beyond the standard library except for ``convert``
(comfyui-autoflow) and the video helpers (PyAV + numpy), which that environment has.

    with ComfyServer(comfy_dir) as srv:         # main.py on a free 127.0.0.1 port; waits for /object_info
        api = srv.convert(ui_workflow)          # UI -> API format (autoflow + this server's object_info)
        set_model_names(api, {("VBLoadImageModel", "model_name"): "tiny.safetensors"})
        set_input_video(api, "clip.mp4")        # LoadVideo.file, a file in srv.input_dir
        entry = srv.run(api, timeout=600)       # post + wait; raises PromptRejected / PromptFailed
        print(srv.output_paths(entry))

The base directory (``custom_nodes/ComfyUI-VideoBridge`` -> repository root, ``models/<key>/``, ``input/``,
``output/``, ``user/``) is a fresh temporary folder unless one is given. The server is stopped by its PID only.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "ComfyUI-VideoBridge"
STANDINS_LINK_NAME = "videobridge-standins"  # tools/comfy_standins, test-only
HOST = "127.0.0.1"  # loopback only, always
MODEL_KEYS = ("checkpoints", "controlnet", "t2i_adapter", "vae", "diffusers", "animatediff_models", "clip_vision", "loras",
              "embeddings", "upscale_models")
IMPORT_FAILED = "(IMPORT FAILED)"  # a custom-node import failure; core extras print "IMPORT FAILED:" without "("


class ComfyError(RuntimeError):
    """Base class for errors from the ComfyUI server."""


class ComfyStartError(ComfyError):
    """The server died, did not become ready in time, or a custom node failed to import."""


class PromptRejected(ComfyError):
    """HTTP 400 from POST /prompt: validation failed. ``node_errors`` maps node id -> {errors, class_type, ...}."""

    def __init__(self, body: dict):
        self.body = body
        self.error = body.get("error", {})
        self.node_errors = body.get("node_errors", {}) or {}
        super().__init__(format_rejection(body))


class PromptFailed(ComfyError):
    """The prompt ran but ended with an error or an interrupt. ``entry`` is its /history entry."""

    def __init__(self, entry: dict):
        self.entry = entry
        self.details = execution_error(entry) or {}
        self.interrupted = is_interrupted(entry)
        super().__init__(format_failure(entry))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; the small race is acceptable for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def default_comfy_dir() -> str | None:
    return os.environ.get("VIDEOBRIDGE_COMFYUI") or os.environ.get("COMFYUI_DIR") or None


class ComfyServer:
    """A ComfyUI server process with its own base directory; a context manager.

    comfy_dir: ComfyUI's directory (has main.py); default ``$VIDEOBRIDGE_COMFYUI``.
    python: interpreter to run it with; default the running one.
    base_dir: base directory; default a new temporary one (removed on exit unless ``keep_base``).
    models_dir: if given, ``<base>/models`` is a symlink to it (persistent model folder).
    extra_model_dirs: more model roots (each with ``<key>/`` sub-folders), passed as an extra-model-paths yaml.
    output_dir / input_dir: override ``<base>/output`` / ``<base>/input``.
    cpu: pass ``--cpu``; None means "unless torch sees CUDA in this process".
    check_imports: fail start-up if the log shows ``(IMPORT FAILED)`` (a custom-node import failure).
    create_model_folders: create the standard ``models/<key>/`` folders (off for a user's own models folder).
    standins: also load ``tools/comfy_standins`` (test-only), which makes ComfyUI's own loaders recognise the tiny
        stand-in checkpoints (CheckpointLoaderSimple, LoraLoader, ControlNetLoader, core VAE nodes).
    """

    def __init__(self, comfy_dir: str | None = None, *, python: str | None = None, base_dir: str | None = None,
                 models_dir: str | None = None, extra_model_dirs: tuple | list = (), output_dir: str | None = None,
                 input_dir: str | None = None, port: int | None = None, cpu: bool | None = True,
                 check_imports: bool = True, startup_timeout: float = 300.0, keep_base: bool = False,
                 extra_args: tuple | list = (), pack_dir: str | os.PathLike = REPO_ROOT, listen_ws: bool = True,
                 create_model_folders: bool = True, standins: bool = False):
        comfy_dir = comfy_dir or default_comfy_dir()
        if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "main.py")):
            raise ComfyStartError(f"no ComfyUI main.py in {comfy_dir!r} (set VIDEOBRIDGE_COMFYUI or COMFYUI_DIR)")
        self.comfy_dir = os.path.abspath(comfy_dir)
        self.python = python or sys.executable
        self._own_base = base_dir is None
        self.base_dir = os.path.abspath(base_dir or tempfile.mkdtemp(prefix="videobridge-comfy-"))
        self.keep_base = keep_base
        self.port = port
        self.cpu = cpu
        self.check_imports = check_imports
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.extra_model_dirs = [os.path.abspath(d) for d in extra_model_dirs]
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self._object_info: dict | None = None
        self._ws: _WsListener | None = None
        self._listen_ws = listen_ws
        self.log_path = os.path.join(self.base_dir, "comfyui.log")

        self.input_dir = os.path.abspath(input_dir or os.path.join(self.base_dir, "input"))
        self.output_dir = os.path.abspath(output_dir or os.path.join(self.base_dir, "output"))
        self.user_dir = os.path.join(self.base_dir, "user")
        self.models_dir = os.path.join(self.base_dir, "models")
        self._layout(models_dir, Path(pack_dir), create_model_folders)
        if standins:
            link = os.path.join(self.base_dir, "custom_nodes", STANDINS_LINK_NAME)
            if not os.path.lexists(link):
                os.symlink(os.path.join(os.path.realpath(pack_dir), "tools", "comfy_standins"), link,
                           target_is_directory=True)

    # ----------------------------------------------------------------- layout
    def _layout(self, models_dir: str | None, pack_dir: Path, create_model_folders: bool) -> None:
        for d in ("custom_nodes", "user", "temp"):
            os.makedirs(os.path.join(self.base_dir, d), exist_ok=True)
        os.makedirs(self.input_dir, exist_ok=True)
        os.makedirs(self.output_dir, exist_ok=True)
        link = os.path.join(self.base_dir, "custom_nodes", PACK_LINK_NAME)
        if os.path.islink(link) or os.path.exists(link):
            if os.path.realpath(link) != os.path.realpath(pack_dir):
                raise ComfyStartError(f"{link} exists and does not point at {pack_dir}")
        else:
            os.symlink(os.path.realpath(pack_dir), link, target_is_directory=True)
        if models_dir:
            models_dir = os.path.abspath(models_dir)
            os.makedirs(models_dir, exist_ok=True)
            if os.path.islink(self.models_dir):
                os.unlink(self.models_dir)
            if os.path.isdir(self.models_dir):
                raise ComfyStartError(f"{self.models_dir} is a real folder; cannot link it to {models_dir}")
            os.symlink(models_dir, self.models_dir, target_is_directory=True)
        else:
            os.makedirs(self.models_dir, exist_ok=True)
        for key in MODEL_KEYS if create_model_folders else ():
            with contextlib.suppress(OSError):  # a read-only shared models folder is fine
                os.makedirs(os.path.join(self.models_dir, key), exist_ok=True)

    def model_path(self, key: str, name: str = "") -> str:
        """``<base>/models/<key>/<name>``."""
        return os.path.join(self.models_dir, key, name) if name else os.path.join(self.models_dir, key)

    def input_path(self, name: str) -> str:
        return os.path.join(self.input_dir, name)

    # ----------------------------------------------------------------- process
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list:
        cpu = self.cpu if self.cpu is not None else not _cuda_available()
        cmd = [self.python, "main.py"]
        if cpu:
            cmd.append("--cpu")
        cmd += ["--listen", HOST, "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
                "--base-directory", self.base_dir,
                "--database-url", "sqlite:///" + os.path.join(self.user_dir, "comfyui.db")]
        if self.output_dir != os.path.join(self.base_dir, "output"):
            cmd += ["--output-directory", self.output_dir]
        if self.input_dir != os.path.join(self.base_dir, "input"):
            cmd += ["--input-directory", self.input_dir]
        if self.extra_model_dirs:
            cmd += ["--extra-model-paths-config", self._write_extra_paths_yaml()]
        return cmd + self.extra_args

    def _write_extra_paths_yaml(self) -> str:
        path = os.path.join(self.base_dir, "extra_model_paths.yaml")
        lines = []
        for i, root in enumerate(self.extra_model_dirs):
            lines.append(f"videobridge_extra_{i}:")
            lines.append(f"    base_path: {json.dumps(root)}")
            for key in MODEL_KEYS:
                if key == "controlnet":                 # ComfyUI's controlnet key also reads models/t2i_adapter
                    lines += ["    controlnet: |", "        controlnet", "        t2i_adapter"]
                elif key != "t2i_adapter":
                    lines.append(f"    {key}: {key}")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        return path

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        if self.port is None:
            self.port = free_port()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if self._listen_ws:
            self._ws = _WsListener(HOST, self.port, self.client_id)
            self._ws.start()
            self._ws.connected.wait(10)  # messages are only sent to a client id once its socket is open
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyStartError(f"ComfyUI exited with code {self.proc.returncode} during start-up; "
                                      f"last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                self._object_info = self._get_json("/object_info", timeout=30)
                break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ComfyStartError(f"ComfyUI not ready after {self.startup_timeout:.0f}s; "
                                      f"last lines of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.25)
        if self.check_imports and self.import_failures():
            raise ComfyStartError("a custom node failed to import:\n" + "\n".join(self.import_failures())
                                  + f"\n--- last lines of {self.log_path}:\n{self.log_tail(80)}")

    def stop(self) -> None:
        """Stop the server by its PID: SIGTERM, wait 10 s, then SIGKILL."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_base and not self.keep_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failures(self) -> list:
        """Lines of the log that report a custom-node import failure."""
        return [ln.strip() for ln in self.log_text().splitlines() if IMPORT_FAILED in ln]

    # ----------------------------------------------------------------- HTTP
    def _request(self, path: str, data: dict | None = None, timeout: float = 60) -> tuple:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _get_json(self, path: str, timeout: float = 60):
        status, raw = self._request(path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path}: HTTP {status}: {raw[:500]!r}")
        return json.loads(raw)

    def get(self, path: str, timeout: float = 60):
        """GET an endpoint and decode its JSON (e.g. ``/system_stats``, ``/models/checkpoints``)."""
        return self._get_json(path, timeout)

    def object_info(self, refresh: bool = False) -> dict:
        """``/object_info`` (cached after start-up; ``refresh=True`` asks again)."""
        if refresh or self._object_info is None:
            self._object_info = self._get_json("/object_info")
        return self._object_info

    def model_names(self, key: str) -> list:
        """What the server lists for a model folder key (``GET /models/<key>``); [] for an unknown key."""
        status, raw = self._request("/models/" + urllib.parse.quote(key))
        return json.loads(raw) if status == 200 else []

    def convert(self, ui_workflow: dict | str | os.PathLike) -> dict:
        """Convert a UI-format workflow (dict or path) to API format with autoflow and this server's object_info."""
        import autoflow  # comfyui-autoflow, installed in the environment

        if not isinstance(ui_workflow, dict):
            with open(ui_workflow, "r", encoding="utf-8") as fh:
                ui_workflow = json.load(fh)
        api = autoflow.convert(ui_workflow, node_info=self.object_info())
        return json.loads(json.dumps(api))  # plain dicts/lists only

    def post(self, api_prompt: dict, ui_workflow: dict | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected (with node_errors) on HTTP 400."""
        body = {"prompt": api_prompt, "client_id": self.client_id}
        if ui_workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": ui_workflow}}
        status, raw = self._request("/prompt", body)
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"error": {"message": raw[:2000].decode("utf-8", "replace")}}
        if status == 400:
            raise PromptRejected(data)
        if status != 200:
            raise ComfyError(f"POST /prompt: HTTP {status} (a UI-format workflow gives 500): {data}\n"
                             f"{self.log_tail(20)}")
        return data["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The /history entry of a finished prompt, or None while it is queued or running."""
        data = self._get_json("/history/" + urllib.parse.quote(prompt_id))
        return data.get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, on_event=None, check: bool = False) -> dict:
        """Poll /history until the prompt has finished; return its entry.

        on_event(msg) is called with websocket messages (``{"type": "progress", "data": {...}}``, ``executing``,
        ...) for this prompt while waiting. check=True raises PromptFailed unless the status is success.
        """
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                self._wait_events(prompt_id, on_event, 0)
                if check and not is_success(entry):
                    raise PromptFailed(entry)
                return entry
            if not self.alive():
                raise ComfyError(f"ComfyUI exited while running prompt {prompt_id}; "
                                 f"last lines of {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s")
            finished = self._wait_events(prompt_id, on_event, delay)
            delay = 0.05 if finished else min(delay * 1.5, 0.5)

    _TERMINAL = ("execution_success", "execution_error", "execution_interrupted")

    def _wait_events(self, prompt_id: str, on_event, seconds: float) -> bool:
        """Pass this prompt's websocket messages to on_event for up to ``seconds`` (a plain sleep without a
        websocket). Returns True early when the prompt's end was announced, so /history is asked at once."""
        ws = self._ws
        if ws is None or not ws.is_alive():
            if ws is not None:
                for msg in ws.drain():
                    self._dispatch(prompt_id, on_event, msg)
            time.sleep(seconds)
            return False
        end = time.monotonic() + seconds
        while True:
            try:
                msg = ws.messages.get(timeout=max(0.0, end - time.monotonic())) if seconds else \
                    ws.messages.get_nowait()
            except queue.Empty:
                return False
            if self._dispatch(prompt_id, on_event, msg):
                return True

    def _dispatch(self, prompt_id: str, on_event, msg) -> bool:
        data = msg.get("data") if isinstance(msg, dict) else None
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        if pid is not None and pid != prompt_id:
            return False
        if on_event is not None:
            on_event(msg)
        typ = msg.get("type")
        return pid == prompt_id and (typ in self._TERMINAL or (typ == "executing" and data.get("node") is None))

    def run(self, api_prompt: dict, timeout: float = 600.0, ui_workflow: dict | None = None, on_event=None) -> dict:
        """post + wait(check=True): the history entry of a successful run, else PromptRejected / PromptFailed."""
        return self.wait(self.post(api_prompt, ui_workflow), timeout=timeout, on_event=on_event, check=True)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt (the running prompt, or only ``prompt_id`` if it is the running one)."""
        self._request("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self._request("/free", {"unload_models": unload_models, "free_memory": free_memory})

    # ----------------------------------------------------------------- outputs
    def output_paths(self, entry: dict, node_id: str | None = None) -> list:
        """Absolute paths of the files a finished prompt reported (all output nodes, or one node id)."""
        roots = {"output": self.output_dir, "input": self.input_dir, "temp": os.path.join(self.base_dir, "temp")}
        paths = []
        for nid, out in (entry.get("outputs") or {}).items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for item in output_items(out):
                root = roots.get(item.get("type", "output"), self.output_dir)
                paths.append(os.path.join(root, item.get("subfolder", "") or "", item["filename"]))
        return paths


def output_items(node_output: dict) -> list:
    """The ``{"filename", "subfolder", "type"}`` records of one node's UI output (images, gifs, video, ...)."""
    items = []
    for value in (node_output or {}).values():
        if isinstance(value, list):
            items.extend(v for v in value if isinstance(v, dict) and "filename" in v)
    return items


# --------------------------------------------------------------------- history entry helpers
def is_success(entry: dict) -> bool:
    return (entry.get("status") or {}).get("status_str") == "success"


def _messages(entry: dict) -> list:
    return (entry.get("status") or {}).get("messages") or []


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message data (node_id, node_type, exception_message, traceback), if any."""
    for msg in _messages(entry):
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] == "execution_error":
            return msg[1]
    return None


def is_interrupted(entry: dict) -> bool:
    return any(isinstance(m, (list, tuple)) and m and m[0] == "execution_interrupted" for m in _messages(entry))


def format_failure(entry: dict) -> str:
    if is_interrupted(entry):
        return "prompt interrupted"
    err = execution_error(entry)
    if not err:
        return f"prompt failed: status {json.dumps(entry.get('status'))[:2000]}"
    tb = "".join(err.get("traceback") or [])
    return (f"node {err.get('node_id')} ({err.get('node_type')}) failed: "
            f"{err.get('exception_type', '')}: {err.get('exception_message', '').strip()}"
            + (f"\n{tb.rstrip()}" if tb else ""))


def format_rejection(body: dict) -> str:
    err = body.get("error") or {}
    lines = [f"prompt rejected: {err.get('message', err)}" + (f" ({err.get('details')})" if err.get("details") else "")]
    for nid, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"  node {nid} ({ne.get('class_type')}): {e.get('type')}: {e.get('message')}"
                         + (f" - {e.get('details')}" if e.get("details") else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------- API prompt helpers
def find_nodes(api_prompt: dict, class_type: str) -> list:
    """Ids of the nodes of one class in an API prompt."""
    return [nid for nid, node in api_prompt.items() if node.get("class_type") == class_type]


def set_model_names(api_prompt: dict, names: dict) -> int:
    """Replace model combo values in place, by node class and input name.

    names: ``{(class_type, input_name): value}`` or ``{class_type: {input_name: value}}``.
    Only inputs that exist and hold a literal (not a link) are replaced. Returns the number replaced.
    """
    flat = {}
    for key, value in names.items():
        if isinstance(value, dict):
            for inp, v in value.items():
                flat[(key, inp)] = v
        else:
            flat[tuple(key)] = value
    n = 0
    for node in api_prompt.values():
        inputs = node.get("inputs", {})
        for (cls, inp), value in flat.items():
            if node.get("class_type") == cls and inp in inputs and not _is_link(inputs[inp]):
                inputs[inp] = value
                n += 1
    return n


def replace_values(api_prompt: dict, mapping: dict) -> int:
    """Replace literal input values equal to a key of ``mapping`` (e.g. official model file names -> fixtures)."""
    n = 0
    for node in api_prompt.values():
        inputs = node.get("inputs", {})
        for inp, v in list(inputs.items()):
            if isinstance(v, str) and v in mapping:
                inputs[inp] = mapping[v]
                n += 1
    return n


VIDEO_LOADERS = {"LoadVideo": "file", "VHS_LoadVideo": "video"}


def set_input_video(api_prompt: dict, filename: str, node_id: str | None = None) -> list:
    """Point the video loader node(s) (core ``LoadVideo.file``) at ``filename`` in the input folder.

    Returns the ids of the nodes changed. ``node_id`` restricts the change to one node.
    """
    changed = []
    for nid, node in api_prompt.items():
        inp = VIDEO_LOADERS.get(node.get("class_type"))
        if inp and (node_id is None or str(nid) == str(node_id)):
            node.setdefault("inputs", {})[inp] = filename
            changed.append(nid)
    return changed


IMAGE_LOADERS = {"LoadImage": "image"}


def set_input_image(api_prompt: dict, filename: str) -> list:
    """Point every core ``LoadImage`` node at ``filename`` in the input folder; returns the ids changed."""
    changed = []
    for nid, node in api_prompt.items():
        inp = IMAGE_LOADERS.get(node.get("class_type"))
        if inp:
            node.setdefault("inputs", {})[inp] = filename
            changed.append(nid)
    return changed


def write_still(video: str, dest: str) -> str:
    """Save the middle frame of ``video`` as a PNG at ``dest`` (the anchor picture of image-to-video workflows when
    none is given); returns ``dest``."""
    from PIL import Image

    frames = read_video(video)
    Image.fromarray(frames[len(frames) // 2]).save(dest)
    return dest


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:
        return False


# --------------------------------------------------------------------- video files (PyAV + numpy)
def write_video(path: str, frames, fps: float = 8, codec: str = "libx264") -> str:
    """Write uint8 RGB frames ``[F, H, W, 3]`` (even H and W) to an mp4 with PyAV."""
    import av
    import numpy as np
    from fractions import Fraction

    frames = np.asarray(frames, dtype=np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video(path: str):
    """Decode a video file to uint8 RGB frames ``[F, H, W, 3]`` (numpy) with PyAV."""
    import av
    import numpy as np

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def synthetic_clip(frames: int = 8, height: int = 64, width: int = 64, seed: int = 0):
    """A moving pattern (diagonal stripes + a bright square travelling left to right), uint8 ``[F,H,W,3]``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    side = max(4, min(height, width) // 4)
    for i in range(frames):
        phase = 2 * np.pi * i / max(frames, 1)
        stripes = 0.5 + 0.5 * np.sin((xx + yy) * (2 * np.pi / 16) - phase)
        img = np.stack([stripes * base[0], (1 - stripes) * base[1], 0.5 * stripes + 0.25 * base[2]], -1)
        x0 = int((width - side) * i / max(frames - 1, 1))
        y0 = (height - side) // 2
        img[y0:y0 + side, x0:x0 + side] = 1.0
        out[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------- minimal websocket reader (stdlib)
class _WsListener(threading.Thread):
    """Reads ComfyUI's /ws text messages (progress, executing, ...) into a queue. Best effort: errors end it."""

    def __init__(self, host: str, port: int, client_id: str, maxsize: int = 10000):
        super().__init__(daemon=True, name="comfy-ws")
        self.host, self.port, self.client_id = host, port, client_id
        self.messages: queue.Queue = queue.Queue(maxsize=maxsize)
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self.connected = threading.Event()

    def run(self) -> None:
        try:
            self._connect()
            self.connected.set()
            while not self._closed.is_set():
                opcode, payload = self._read_frame()
                if opcode == 0x1:
                    try:
                        msg = json.loads(payload.decode("utf-8"))
                    except ValueError:
                        continue
                    with contextlib.suppress(queue.Full):
                        self.messages.put_nowait(msg)
                elif opcode == 0x8:
                    break
                elif opcode == 0x9:
                    self._send(0xA, payload)
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            self.connected.set()
            with contextlib.suppress(OSError):
                if self._sock is not None:
                    self._sock.close()

    def _connect(self) -> None:
        s = socket.create_connection((self.host, self.port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /ws?clientId={self.client_id} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            buf += chunk
        head, self._rest = buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError("websocket handshake refused")
        s.settimeout(None)
        self._sock = s

    def _recv_exact(self, n: int) -> bytes:
        out = self._rest[:n]
        self._rest = self._rest[n:]
        while len(out) < n:
            chunk = self._sock.recv(max(65536, n - len(out)))
            if not chunk:
                raise ConnectionError("websocket closed")
            out += chunk
        if len(out) > n:
            self._rest = out[n:] + self._rest
            out = out[:n]
        return out

    def _read_frame(self) -> tuple:
        message, opcode = b"", None
        while True:
            b0, b1 = self._recv_exact(2)
            op = b0 & 0x0F
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._recv_exact(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._recv_exact(8))[0]
            mask = self._recv_exact(4) if b1 & 0x80 else None
            payload = self._recv_exact(length)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            if op >= 0x8:  # control frames are never fragmented
                return op, payload
            if op != 0x0:
                opcode = op
            message += payload
            if b0 & 0x80:
                return opcode, message

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode, 0x80 | len(payload)]) if len(payload) < 126 else None
        if header is None:
            return
        self._sock.sendall(header + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))

    def drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._closed.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                self._send(0x8)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
