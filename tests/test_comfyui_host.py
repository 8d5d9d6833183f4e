"""The pack inside a real ComfyUI server: load, list, queue the example workflow, validate.

COMFYUI_DIR points at a ComfyUI checkout; without it the tests skip, except under CI (CI=true),
where it defaults to ../shared/comfyui beside the repo and a missing ComfyUI fails them.
COMFYUI_PYTHON is the Python of that checkout's environment (default: the interpreter running
the tests); `.ci/run` builds one and sets both. Everything the
server writes (user data, inputs, outputs, temp files) goes to a tmp folder; the pack and the
tiny I2VGen-XL oracle model are reached through an extra_model_paths.yaml (`custom_nodes:` and
`diffusers:` entries), so the ComfyUI checkout is not modified.

Run: COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/ComfyUI/.venv/bin/python \
     pytest tests/test_comfyui_host.py -s
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SHARED_ROOT, UNDER_CI, oracle_path, skip_unless_ci
from test_nodes import build_tiny_instruct_pix2pix

COMFYUI_DIR = os.environ.get("COMFYUI_DIR") or (str(SHARED_ROOT / "comfyui") if UNDER_CI else None)
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)

pytestmark = pytest.mark.comfyui_host

OUR_NODES = ("LoadI2VBackbone", "AnyV2VSelectFrames", "DDIMInvertVideo", "CaptureFeatures", "InjectedSampler",
             "FirstFrameEditor")
TINY_MODEL = "anyv2v-tiny-i2vgenxl"
TINY_IP2P = "anyv2v-tiny-instruct-pix2pix"
FRAMES, SIZE = 8, 64
STARTUP_TIMEOUT_S = 180
RUN_TIMEOUT_S = 600

# Tiny settings for the tiny model: one input value per (class_type, input name).
TINY_SETTINGS = {
    "LoadVideo": {"file": "source.mp4"},
    "LoadImage": {"image": "edited_first_frame.png"},
    "LoadI2VBackbone": {"model": TINY_MODEL, "repo_id": "", "dtype": "fp32"},
    "AnyV2VSelectFrames": {"start_frame": 0, "every_nth": 1, "frame_count": 0},
    "DDIMInvertVideo": {"width": SIZE, "height": SIZE, "frame_count": FRAMES, "inversion_steps": 10, "sampling_steps": 5},
    "FirstFrameEditor": {"width": SIZE, "height": SIZE, "model": TINY_IP2P, "steps": 2},
    "InjectedSampler": {"prompt": "a blue square moving"},
}


# ---------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MiniWebSocket:
    """Just enough of RFC 6455 to read ComfyUI's status messages (stdlib only)."""

    def __init__(self, host: str, port: int, path: str, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"websocket upgrade refused: {head[:200]!r}")

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the websocket")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)  # client frames must be masked
        header = bytes([0x80 | opcode, 0x80 | len(payload)])  # control payloads are < 126 bytes
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next whole data message; answers pings, raises on close."""
        message, message_opcode = b"", None
        while True:
            first, second = self._read(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("the server closed the websocket")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            message += payload
            message_opcode = opcode if opcode else message_opcode
            if first & 0x80:
                return message_opcode, message

    def close(self) -> None:
        try:
            self._send(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class ComfyServer:
    def __init__(self, base: str, process: subprocess.Popen, log_path: Path, output_dir: Path) -> None:
        self.base, self.process, self.log_path, self.output_dir = base, process, log_path, output_dir

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> int:
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status

    def post_prompt(self, prompt: dict, client_id: str) -> tuple[int, dict]:
        body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
        request = urllib.request.Request(self.base + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def run(self, prompt: dict, on_message=None) -> dict:
        """Queue a prompt, follow the websocket until it finishes; returns what was seen.
        `on_message(kind, data)` sees every message of the run (e.g. to interrupt it)."""
        client_id = uuid.uuid4().hex
        host, port = self.base.removeprefix("http://").split(":")
        socket_ = MiniWebSocket(host, int(port), f"/ws?clientId={client_id}", timeout=RUN_TIMEOUT_S)
        seen = {"executed": [], "cached": [], "progress": 0, "error": None, "interrupted": False}
        try:
            status, answer = self.post_prompt(prompt, client_id)
            assert status == 200, f"/prompt refused the workflow: {json.dumps(answer, indent=1)[:3000]}"
            prompt_id = answer["prompt_id"]
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while time.monotonic() < deadline:
                opcode, payload = socket_.receive()
                if opcode != 0x1:
                    continue  # binary frames are previews
                message = json.loads(payload)
                kind, data = message["type"], message.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if on_message is not None:
                    on_message(kind, data)
                if kind == "executed":
                    seen["executed"].append(data["node"])
                elif kind == "execution_cached":
                    seen["cached"].extend(data["nodes"])
                elif kind == "progress":
                    seen["progress"] += 1
                elif kind == "execution_error":
                    seen["error"] = data
                elif kind == "execution_interrupted":
                    seen["interrupted"] = True
                elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
            else:
                pytest.fail(f"the workflow did not finish within {RUN_TIMEOUT_S} s\n{self.log_tail()}")
        finally:
            socket_.close()
        seen["history"] = self.get(f"/history/{prompt_id}")[prompt_id]
        return seen


def api_workflow(name: str) -> dict:
    """An API-format example workflow with the tiny model and tiny settings."""
    prompt = json.loads((REPO_ROOT / "workflows" / "api" / name).read_text())
    for node in prompt.values():
        for key, value in TINY_SETTINGS.get(node["class_type"], {}).items():
            assert key in node["inputs"], f"{name}: {node['class_type']} has no input {key}"
            node["inputs"][key] = value
    return prompt


def video_output_only(prompt: dict) -> dict:
    """The prompt without its image outputs: ComfyUI still queues the outputs that validate, so a
    bad input in the video branch is a plain HTTP 400 only when no other output is left."""
    return {key: node for key, node in prompt.items() if node["class_type"] not in ("SaveImage", "PreviewImage")}


def node_id(prompt: dict, class_type: str) -> str:
    (found,) = [key for key, node in prompt.items() if node["class_type"] == class_type]
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not COMFYUI_DIR:
        skip_unless_ci("COMFYUI_DIR is not set (path to a ComfyUI checkout to test the pack in)")
    if not (Path(COMFYUI_DIR) / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py; point it at a ComfyUI checkout")
    root = tmp_path_factory.mktemp("comfyui_host")
    base = comfyui_folders(root)
    add_tiny_unet_models(root / "diffusers", base / "input")
    config = root / "extra_model_paths.yaml"
    config.write_text(f"anyv2v_host_test:\n    custom_nodes: {root / 'custom_nodes'}\n    diffusers: {root / 'diffusers'}\n")
    with running_comfyui(root, base, config) as host:
        yield host


def comfyui_folders(root: Path, test_nodes: bool = False) -> Path:
    """root/custom_nodes with the pack (and, with `test_nodes`, tests/comfyui_test_nodes) for an
    extra_model_paths.yaml, and ComfyUI's --base-directory root/base (its own empty custom_nodes,
    models, input folders and user data); returns the base directory."""
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "anyv2v").symlink_to(REPO_ROOT, target_is_directory=True)
    if test_nodes:
        (root / "custom_nodes" / "anyv2v_test_nodes").symlink_to(REPO_ROOT / "tests" / "comfyui_test_nodes")
    base = root / "base"
    for folder in ("input", "custom_nodes", "models"):
        (base / folder).mkdir(parents=True)
    return base


@contextlib.contextmanager
def running_comfyui(root: Path, base: Path, config: Path):
    """A ComfyUI server (--cpu) on a free port with `base` as its base directory and `config` as its
    extra model paths; stopped when the block ends."""
    port = free_port()
    log_path = root / "server.log"
    command = [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--output-directory", str(base / "output"),
               "--extra-model-paths-config", str(config), "--database-url", "sqlite:///:memory:"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads, and a shared CI machine loses
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT, env=env)
    host = ComfyServer(f"http://127.0.0.1:{port}", process, log_path, base / "output")
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode} while starting:\n{host.log_tail()}")
            try:
                host.get("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() - started > STARTUP_TIMEOUT_S:
                    pytest.fail(f"ComfyUI was not ready after {STARTUP_TIMEOUT_S} s:\n{host.log_tail()}")
                time.sleep(1)
        print(f"\nComfyUI ready in {time.monotonic() - started:.1f} s ({COMFYUI_DIR})")
        yield host
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def add_tiny_unet_models(diffusers: Path, inputs: Path) -> None:
    """The tiny I2VGen-XL oracle and a tiny InstructPix2Pix under `diffusers` (a diffusers models folder), the
    oracle's source clip and edited first frame in `inputs` (ComfyUI's input folder)."""
    diffusers.mkdir()
    (diffusers / TINY_MODEL).symlink_to(oracle_path("anyv2v-i2vgenxl") / "model", target_is_directory=True)
    build_tiny_instruct_pix2pix(diffusers / TINY_IP2P)
    write_source_video(inputs / "source.mp4")
    shutil.copyfile(oracle_path("anyv2v-i2vgenxl") / "edited_first_frame.png", inputs / "edited_first_frame.png")


def write_source_video(path: Path) -> None:
    from anyv2v_core.video import read_frames, write_video

    frames, _ = read_frames(oracle_path("anyv2v-i2vgenxl") / "source_frames")
    write_video(path, frames, fps=8)


def saved_files(history: dict, key: str = "images") -> list[dict]:
    """The files a run saved to the output folder, from its /history entry. Newer ComfyUI lists more there
    (LoadVideo reports its input file, type "input"; previews are type "temp"): only type "output" counts."""
    return [item for output in history["outputs"].values() for item in output.get(key, [])
            if item.get("type") == "output"]


def read_output_video(server: ComfyServer, history: dict) -> tuple[Path, int, tuple[int, int]]:
    from anyv2v_core.video import read_frames

    files = [item for item in saved_files(history) if Path(item["filename"]).suffix in (".mp4", ".webm", ".mov")]
    assert len(files) == 1, f"expected one saved video, got {history['outputs']}"
    path = server.output_dir / files[0]["subfolder"] / files[0]["filename"]
    assert path.is_file(), f"{path} was reported but does not exist"
    frames, _ = read_frames(path)
    return path, int(frames.shape[0]), (int(frames.shape[2]), int(frames.shape[1]))


# ---------------------------------------------------------------------------------------------- tests


def test_saved_files_are_the_output_folders_whatever_else_history_lists():
    """Newer ComfyUI's /history also lists LoadVideo's input file (type "input") and previews (type "temp")."""
    history = {"outputs": {
        "1": {"images": [{"filename": "source.mp4", "subfolder": "", "type": "input"}]},
        "10": {"images": [{"filename": "AnyV2V_00001_.mp4", "subfolder": "video", "type": "output"}],
               "animated": [True]},
        "11": {"images": [{"filename": "ComfyUI_temp_00001_.png", "subfolder": "", "type": "temp"}]},
    }}
    assert [item["filename"] for item in saved_files(history)] == ["AnyV2V_00001_.mp4"]


def test_pack_loads_and_lists_nodes(server):
    failed = [line for line in server.log_path.read_text(errors="replace").splitlines()
              if "(IMPORT FAILED)" in line and line.rstrip().endswith("anyv2v")]
    assert not failed, f"ComfyUI could not import the pack:\n{server.log_tail(120)}"
    info = server.get("/object_info")
    missing = [name for name in OUR_NODES if name not in info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{server.log_tail()}"
    for name in OUR_NODES:
        assert info[name]["category"].startswith("AnyV2V/"), info[name]["category"]
        assert info[name]["description"], f"{name} has no description"
    models = info["LoadI2VBackbone"]["input"]["required"]["model"][0]
    assert TINY_MODEL in models, f"the tiny model is not listed from the diffusers path: {models}"
    print(f"/object_info lists {len(OUR_NODES)} AnyV2V nodes; LoadI2VBackbone models: {models}")


def test_external_first_frame_workflow_runs_and_caches_inversion(server):
    prompt = api_workflow("anyv2v_external_first_frame.json")
    started = time.monotonic()
    first = server.run(prompt)
    assert first["error"] is None, f"execution error: {first['error']}\n{server.log_tail()}"
    path, count, size_wh = read_output_video(server, first["history"])
    print(f"first run: {time.monotonic() - started:.1f} s, {first['progress']} progress messages, "
          f"saved {path.name} with {count} frames at {size_wh[0]}x{size_wh[1]}")
    assert count == FRAMES and size_wh == (SIZE, SIZE)
    assert first["progress"] > 0, "no progress message reached the websocket"

    # invert once, edit many: a new prompt must reuse the cached inversion
    prompt[node_id(prompt, "InjectedSampler")]["inputs"]["prompt"] = "a green square moving"
    started = time.monotonic()
    second = server.run(prompt)
    assert second["error"] is None, f"execution error: {second['error']}\n{server.log_tail()}"
    assert node_id(prompt, "DDIMInvertVideo") in second["cached"], f"inversion re-ran: cached {second['cached']}"
    _, count, _ = read_output_video(server, second["history"])
    print(f"second run (new prompt): {time.monotonic() - started:.1f} s, cached nodes {sorted(second['cached'])}")
    assert count == FRAMES


def test_prompt_edit_workflow_runs_the_builtin_first_frame_edit(server):
    prompt = api_workflow("anyv2v_prompt_edit.json")
    started = time.monotonic()
    seen = server.run(prompt)
    assert seen["error"] is None, f"execution error: {seen['error']}\n{server.log_tail()}"
    assert node_id(prompt, "PreviewImage") in seen["executed"], "the edited first frame was not previewed"
    path, count, size_wh = read_output_video(server, seen["history"])
    print(f"prompt-edit workflow (tiny InstructPix2Pix): {time.monotonic() - started:.1f} s, saved {path.name} with "
          f"{count} frames at {size_wh[0]}x{size_wh[1]}")
    assert count == FRAMES and size_wh == (SIZE, SIZE)


def error_inputs(answer: dict, node: str) -> set[str]:
    """The inputs a /prompt refusal files its errors of `node` under (the frontend marks those in red)."""
    return {error["extra_info"]["input_name"] for error in answer["node_errors"][node]["errors"]}


def test_bad_inputs_are_validation_errors_under_the_inputs_they_are_about(server):
    # an InstructPix2Pix model that the host does not have: about the model (and the mode that needs one)
    prompt = video_output_only(api_workflow("anyv2v_prompt_edit.json"))
    editor = node_id(prompt, "FirstFrameEditor")
    prompt[editor]["inputs"]["model"] = "instruct-pix2pix"
    status, answer = server.post_prompt(prompt, uuid.uuid4().hex)
    assert status == 400, answer
    errors = answer["node_errors"][editor]["errors"]
    print(f"missing InstructPix2Pix model -> HTTP {status} under {sorted(error_inputs(answer, editor))}: "
          f"{errors[0]['details']}")
    assert errors[0]["type"] == "custom_validation_failed" and "instruct" in errors[0]["details"].lower()
    assert error_inputs(answer, editor) == {"mode", "model"}

    # inversion steps that never reach the sampling timesteps: about the two step counts
    prompt = video_output_only(api_workflow("anyv2v_external_first_frame.json"))
    inverter = node_id(prompt, "DDIMInvertVideo")
    prompt[inverter]["inputs"].update(inversion_steps=3, sampling_steps=5)
    status, answer = server.post_prompt(prompt, uuid.uuid4().hex)
    assert status == 400, answer
    errors = answer["node_errors"][inverter]["errors"]
    print(f"3 inversion steps for 5 sampling steps -> HTTP {status} under {sorted(error_inputs(answer, inverter))}: "
          f"{errors[0]['details']}")
    assert "inversion" in errors[0]["details"]
    assert error_inputs(answer, inverter) == {"inversion_steps", "sampling_steps"}

    # sizes and windows out of range: ComfyUI's own checks, each under its input
    prompt[inverter]["inputs"].update(inversion_steps=10, width=32, window_overlap=2000)
    status, answer = server.post_prompt(prompt, uuid.uuid4().hex)
    assert status == 400, answer
    assert {(error["type"], error["extra_info"]["input_name"]) for error in answer["node_errors"][inverter]["errors"]} \
        == {("value_smaller_than_min", "width"), ("value_bigger_than_max", "window_overlap")}

    # a model name outside the configured folders
    prompt[inverter]["inputs"].update(width=SIZE, window_overlap=4)
    loader = node_id(prompt, "LoadI2VBackbone")
    prompt[loader]["inputs"]["model"] = "../" + TINY_MODEL
    status, answer = server.post_prompt(prompt, uuid.uuid4().hex)
    assert status == 400, answer
    errors = answer["node_errors"][loader]["errors"]
    print(f"model '../{TINY_MODEL}' -> HTTP {status}: {errors[0]['details']}")
    assert "model" in error_inputs(answer, loader)
    assert server.process.poll() is None, "the server died on a bad input"


def test_a_size_no_widget_can_give_fails_the_inversion_before_it_starts(server):
    """The frontend snaps width to multiples of 8; an API client can send 100: DDIMInvertVideo then fails
    with the size error before inverting anything."""
    prompt = video_output_only(api_workflow("anyv2v_external_first_frame.json"))
    inverter = node_id(prompt, "DDIMInvertVideo")
    prompt[inverter]["inputs"]["width"] = 100
    seen = server.run(prompt)
    assert seen["error"] is not None, "a width of 100 was inverted"
    print(f"width 100 -> execution error in {seen['error']['node_type']}: {seen['error']['exception_message']}")
    assert seen["error"]["node_id"] == inverter and "multiples of 8" in seen["error"]["exception_message"]
    assert seen["progress"] == 0, "the inversion started"


# ---------------------------------------------------------------------------------------------- memory accounting


def log_since(server: ComfyServer, offset: int) -> str:
    return server.log_path.read_text(errors="replace")[offset:]


def test_comfyui_accounts_for_a_kept_backbone_and_its_unload_releases_it(server):
    """With "keep loaded", ComfyUI's model management holds the backbone (its load request is in the
    log) and the pack unloads nothing itself; ComfyUI's own unload (POST /free) evicts it; a workflow
    with another model (the built-in InstructPix2Pix edit, then AnyV2V) still runs in the same server."""
    start = len(server.log_path.read_text(errors="replace"))
    prompt = api_workflow("anyv2v_external_first_frame.json")
    prompt[node_id(prompt, "LoadI2VBackbone")]["inputs"]["memory"] = "keep loaded"
    prompt[node_id(prompt, "InjectedSampler")]["inputs"]["prompt"] = "a yellow square moving"  # not cached
    seen = server.run(prompt)
    assert seen["error"] is None, f"execution error: {seen['error']}\n{server.log_tail()}"
    log = log_since(server, start)
    assert "Requested to load AnyV2VBackboneModules" in log, f"ComfyUI was not asked to load the backbone:\n{log}"
    assert "ComfyUI unloads" not in log, "a model was unloaded though nothing needed the memory"

    start = len(server.log_path.read_text(errors="replace"))
    # ComfyUI's worker reads the flag when its queue wakes it; a /free that lands while it collects garbage
    # after a prompt does not wake it (it then sleeps up to 1000 s), so the request is repeated until it does
    deadline = time.monotonic() + 60
    while "ComfyUI unloads i2vgen-xl" not in log_since(server, start):
        assert time.monotonic() < deadline, f"ComfyUI's unload did not reach the backbone:\n{server.log_tail()}"
        assert server.post("/free", {"unload_models": True}) == 200
        time.sleep(2)
    print(f"\nComfyUI's unload: {log_since(server, start).strip().splitlines()[-1]}")

    start = len(server.log_path.read_text(errors="replace"))
    prompt = api_workflow("anyv2v_prompt_edit.json")
    prompt[node_id(prompt, "LoadI2VBackbone")]["inputs"]["memory"] = "keep loaded"
    seen = server.run(prompt)
    assert seen["error"] is None, f"execution error: {seen['error']}\n{server.log_tail()}"
    _, count, _ = read_output_video(server, seen["history"])
    assert count == FRAMES
    assert "Requested to load AnyV2VBackboneModules" in log_since(server, start), "the backbone was not loaded again"
