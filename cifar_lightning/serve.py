"""cifar-serve: a model behind HTTP, with dynamic batching (LitServe) and a drop-an-image page.

    cifar-serve model.onnx                       # http://127.0.0.1:8000/
    curl -F file=@cat.jpg http://127.0.0.1:8000/predict

    from cifar_lightning.serve import build_server
    server = build_server("model.onnx", max_batch_size=32)    # a litserve.LitServer; server.app is FastAPI
    server.run(host="127.0.0.1", port=8000, generate_client_file=False)   # LitServe's own default host is 0.0.0.0

Every upload is checked and decoded in the HTTP process, before it can join a batch:
LitServe's batched loop answers a whole batch with the error of any one of its requests, so a
bad upload must never reach it. The worker then receives only valid 32x32 images and runs
them, many at a time, through the one inference path (``inference.load_classifier``, with the
model's test-time views): served probabilities equal ``cifar-predict``'s.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifar_lightning.errors import ConfigError, ImageError, ImageTooLargeError, NotAnImageError
from cifar_lightning.fileio import sha256_of
from cifar_lightning.images import IMAGE_SIZE, decode
from cifar_lightning.inference import device_for, load_classifier
from cifar_lightning.runs import known_test_accuracy

PAGE = Path(__file__).with_name("serve_page.html")
MAX_TOP_K = 100


class BadRequestError(Exception):
    """An upload the server refuses: a status and one line for {"error": ...}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes) -> np.ndarray:
    """Image bytes -> (32, 32, 3) uint8 by the one decode policy and its bounds (``images.decode``)."""
    if not data:
        raise BadRequestError(400, "empty image")
    try:
        return decode(io.BytesIO(data), "upload")
    except NotAnImageError as e:
        raise BadRequestError(415, str(e)) from None
    except ImageTooLargeError as e:
        raise BadRequestError(413, str(e)) from None
    except ImageError as e:
        raise BadRequestError(400, str(e).splitlines()[0][:300]) from None


def _top_k(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadRequestError(400, f"top_k must be an integer, got {str(value)[:40]!r}") from None
    if not 1 <= k <= MAX_TOP_K:
        raise BadRequestError(400, f"top_k must be in 1..{MAX_TOP_K}, got {k}")
    return k


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes: never read whole."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequestError(400, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequestError(413, f"upload over the {limit // (1 << 20)} MB limit (--max-upload-mb)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def parse_predict_request(scope: Scope, receive: Receive, limit: int, default_top_k: int) -> dict[str, Any]:
    """A POST /predict -> {"pixels": base64 of 32x32x3 uint8, "top_k": k, "preview": bool}."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequestError(413, f"upload over the {limit // (1 << 20)} MB limit (--max-upload-mb)")
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/json"):
        raise BadRequestError(415, "send the image as multipart/form-data (field 'file') or JSON {\"image\": \"<base64>\"}")
    body = await _read_body(receive, limit)
    if not body:
        raise BadRequestError(400, "empty request body")
    if content_type == "application/json":
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequestError(400, "the body is not valid JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
            raise BadRequestError(422, "expected JSON {\"image\": \"<base64>\", \"top_k\": k}")
        try:
            data = base64.b64decode(payload["image"].split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError(400, "'image' is not valid base64") from None
        top_k, preview = payload.get("top_k"), payload.get("preview")
    else:
        form = await Request({**scope, "type": "http"}, _replay(body)).form(max_files=1, max_fields=10)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadRequestError(422, "expected the image in the multipart field 'file'")
        data = await upload.read()
        top_k, preview = form.get("top_k"), form.get("preview")
    pixels = decode_upload(data)
    return {"pixels": base64.b64encode(pixels.tobytes()).decode(), "top_k": _top_k(top_k, default_top_k),
            "preview": str(preview).lower() in ("1", "true", "yes")}  # fmt: skip


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class CheckUploads:
    """ASGI middleware: POST /predict is bounded, parsed and decoded here; bad input gets its
    4xx and {"error": ...}; good input reaches LitServe as a small JSON of 32x32 pixels."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int, default_top_k: int) -> None:
        self.app, self.limit, self.default_top_k = app, max_upload_bytes, default_top_k

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            payload = await parse_predict_request(scope, receive, self.limit, self.default_top_k)
        except BadRequestError as e:
            return await JSONResponse({"error": str(e)}, status_code=e.status)(scope, receive, send)
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self.app({**scope, "headers": headers}, _replay(body), send)


class ClassifierAPI(ls.LitAPI):
    """The worker side: batches of valid 32x32 images -> top-k classes with probabilities."""

    def __init__(self, model: str, accelerator: str = "cpu", max_batch_size: int = 32, batch_timeout: float = 0.005,
                 calibrate: bool = True) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.model_path, self.accelerator, self.calibrate = model, accelerator, calibrate

    def setup(self, device: str) -> None:
        device = device if self.model_path.endswith((".ckpt", ".safetensors")) else "cpu"
        self.clf = load_classifier(self.model_path, device=device, calibrate=self.calibrate)
        self.name = str(self.clf.info.get("model") or Path(self.model_path).stem)

    def decode_request(self, request: dict) -> dict:
        return request  # checked and decoded by CheckUploads in the HTTP process

    def batch(self, inputs: list[dict]) -> list[dict]:
        return inputs

    def predict(self, inputs: list[dict] | dict) -> list[dict]:
        items = inputs if isinstance(inputs, list) else [inputs]
        pixels = np.stack([np.frombuffer(base64.b64decode(r["pixels"]), np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3) for r in items])
        probs = self.clf.probabilities(torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2))
        out = []
        for r, image, p in zip(items, pixels, probs, strict=True):
            result: dict[str, Any] = {"model": self.name, "top_k": self.clf.top_k(p[None], r["top_k"])[0]}
            if r.get("preview"):
                result["input_png"] = _png_data_url(image)  # the 32x32 the model saw, for the page
            out.append(result)
        return out if isinstance(inputs, list) else out[0]

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> dict:
        return output


def _png_data_url(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def model_info(model: str | Path, clf: Any) -> dict[str, Any]:
    """What GET /info says: enough to tell which model answers and how good it is."""
    path = Path(model)
    info = clf.info
    accuracy = info.get("test_accuracy")
    if accuracy is None and path.suffix.lower() == ".ckpt":
        accuracy = known_test_accuracy(path)
    return {
        "model": str(info.get("model") or path.stem),
        "file": path.name,
        "sha256": sha256_of(path),
        "classes": list(clf.class_names),
        "test_accuracy": accuracy,
        "test_time_augmentation": bool(clf.tta),
        "tta_level": int(clf.tta),
        # Probabilities divided by the model's fitted temperature (1.0: raw, or never fitted).
        "calibrated": clf.calibrated,
        "temperature": clf.temperature,
    }


def build_server(model: str | Path, max_batch_size: int = 32, batch_timeout: float = 0.005, workers: int = 1,
                 accelerator: str = "cpu", top_k: int = 5, max_upload_mb: float = 10, calibrate: bool = True) -> ls.LitServer:  # fmt: skip
    """The server object, for ``server.run(...)`` or for tests (``server.app`` is FastAPI). The
    model is loaded here first, so a bad MODEL fails at once with a ModelError."""
    device = device_for(accelerator)  # an accelerator this machine lacks fails here, in one line
    clf = load_classifier(model, calibrate=calibrate)  # refuses a bad, unsafe or foreign model file before any worker starts
    info = model_info(model, clf)
    api = ClassifierAPI(str(model), accelerator, max_batch_size, batch_timeout, calibrate)
    server = ls.LitServer(
        api, accelerator=device, workers_per_device=workers,
        info_path="/litserve/info", model_metadata=info, max_payload_size=int(max_upload_mb * (1 << 20)) + 65536,
        middlewares=[(CheckUploads, {"max_upload_bytes": int(max_upload_mb * (1 << 20)), "default_top_k": top_k})],
    )  # fmt: skip
    page = PAGE.read_text()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def info_route(request: Request) -> Response:
        return JSONResponse(info)

    # LitServe answers "/" with a plain "litserve running": the page takes its place.
    server.app.router.routes[:] = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_route("/", index, methods=["GET"])
    server.app.add_route("/info", info_route, methods=["GET"])

    async def as_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return JSONResponse({"error": str(getattr(exc, "detail", exc))}, status_code=status)

    server.app.add_exception_handler(StarletteHTTPException, as_error)
    return server


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32, batch_timeout: float = 0.005,
                  workers: int = 1, accelerator: str = "cpu", top_k: int = 5, max_upload_mb: float = 10.0,
                  calibrate: bool = True) -> None:  # fmt: skip
    """cifar-serve: build the server, then serve until Ctrl-C or SIGTERM (which stop the workers too)."""
    if not (0 <= port <= 65535 and 0 <= batch_timeout < 60 and 0 < max_upload_mb <= 1024):
        raise ConfigError("--port, --batch-timeout or --max-upload-mb out of range")
    server = build_server(model, max_batch_size, batch_timeout, workers, accelerator, top_k, max_upload_mb, calibrate)
    main_pid = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:  # a forked LitServe process: die as SIGTERM means
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt  # LitServe's own shutdown path: it stops its workers too

    signal.signal(signal.SIGTERM, stop)
    print(f"cifar-serve: {model} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.run(host=host, port=port, generate_client_file=False, log_level="warning")
    except KeyboardInterrupt:
        pass
