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
model's test-time views): served probabilities equal ``cifar-predict``'s. An image the model
still gives NaN or infinite scores for gets its own 422; the rest of its batch is answered.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifar_lightning import bundled
from cifar_lightning.devices import device_for
from cifar_lightning.errors import ConfigError, ImageError, ImageTooLargeError, ModelError, NotAnImageError
from cifar_lightning.fileio import sha256_of
from cifar_lightning.images import IMAGE_SIZE, decode
from cifar_lightning.inference import load_classifier
from cifar_lightning.runs import known_test_accuracy

PAGE = Path(__file__).with_name("serve_page.html")
MAX_TOP_K = 100
#: the only hosts LitServe's run() accepts; a name such as localhost is resolved to one of them
LISTENABLE = ("127.0.0.1", "0.0.0.0", "::")
NON_FINITE = "the model gave NaN or infinite scores for this image"


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
    """A form sends top_k as text, JSON as a number: a whole, finite one (3.0 is 3; 2.5, 1e999,
    NaN and true are refused, not truncated, overflowed or read as 1)."""
    if value is None or value == "":
        return default
    if isinstance(value, float) and value.is_integer():  # False for NaN and infinities
        value = int(value)
    try:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError
        k = int(value)
    except (TypeError, ValueError):
        raise BadRequestError(400, f"top_k must be an integer, got {str(value)[:40]!r}") from None
    if not 1 <= k <= MAX_TOP_K:
        raise BadRequestError(400, f"top_k must be in 1..{MAX_TOP_K}, got {str(k)[:40]}")
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
        # Bounded: one file, a few fields (starlette also caps each field at 1 MB). Its refusals
        # (a second file, no boundary...) become 400s in CheckUploads.
        async with Request({**scope, "type": "http"}, _replay(body)).form(max_files=1, max_fields=10) as form:
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
        except Exception as e:  # whatever an upload provokes here is its 4xx, never a 500
            status, message = _refusal(e)
            return await JSONResponse({"error": message}, status_code=status)(scope, receive, send)
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self.app({**scope, "headers": headers}, _replay(body), send)


def _refusal(e: Exception) -> tuple[int, str]:
    """The 4xx and one line for an exception raised while parsing an upload. A middleware runs
    outside the app's exception handlers, so anything it lets escape, even starlette's own
    HTTPException for a malformed multipart body, would be answered with a 500."""
    if isinstance(e, BadRequestError):
        return e.status, str(e)
    if isinstance(e, StarletteHTTPException | MultiPartException):  # their messages are meant for clients
        status = e.status_code if isinstance(e, StarletteHTTPException) and 400 <= e.status_code < 500 else 400
        return status, "the upload could not be read: " + " ".join(str(getattr(e, "detail", e)).split())[:300]
    return 400, f"the upload could not be read ({type(e).__name__})"


class ClassifierAPI(ls.LitAPI):
    """The worker side: batches of valid 32x32 images -> top-k classes with probabilities."""

    def __init__(self, model: str, accelerator: str = "cpu", max_batch_size: int = 32, batch_timeout: float = 0.005,
                 calibrate: bool = True) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.model_path, self.accelerator, self.calibrate = model, accelerator, calibrate

    def setup(self, device: str) -> None:
        # Each kind runs where it can (modelfile.Kind.device): a graph export on the CPU, weights on the GPU.
        self.clf = load_classifier(self.model_path, device=device, calibrate=self.calibrate)
        self.name = self.clf.info["name"]  # as the page, /info and cifar-predict name it

    def decode_request(self, request: dict) -> dict:
        return request  # checked and decoded by CheckUploads in the HTTP process

    def batch(self, inputs: list[dict]) -> list[dict]:
        return inputs

    def predict(self, inputs: list[dict] | dict) -> list[dict]:
        items = inputs if isinstance(inputs, list) else [inputs]
        pixels = np.stack([np.frombuffer(base64.b64decode(r["pixels"]), np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3) for r in items])
        out: list[dict] = []
        for r, image, probs in zip(items, pixels, self._probabilities(pixels), strict=True):
            if probs is None:
                out.append({"error": NON_FINITE})
                continue
            result: dict[str, Any] = {"model": self.name, "top_k": self.clf.top_k(probs[None], r["top_k"])[0]}
            if r.get("preview"):
                result["input_png"] = _png_data_url(image)  # the 32x32 the model saw, for the page
            out.append(result)
        return out if isinstance(inputs, list) else out[0]

    def _probabilities(self, pixels: np.ndarray) -> list[torch.Tensor | None]:
        """Each image's probabilities, None where the model gives NaN or infinity. The batch runs
        as one; only if that fails, image by image: LitServe's batch loop answers the whole batch
        with any exception raised in predict or encode_response, so one image must not raise."""
        try:
            probs = self.clf.probabilities(torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2))
        except ModelError:
            return [None] if len(pixels) == 1 else [self._probabilities(pixels[i : i + 1])[0] for i in range(len(pixels))]
        return [p if bool(torch.isfinite(p).all()) else None for p in probs]

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> Response:
        # A finished response (it pickles) is how one request of a batch gets its own status:
        # LitServe returns it as is. (LitServe reads this annotation as the route's response type.)
        return JSONResponse(output, status_code=422 if "error" in output else 200)


def _png_data_url(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def model_info(model: str | Path, clf: Any) -> dict[str, Any]:
    """What GET /info says: enough to tell which model answers and how good it is."""
    path = Path(clf.source)  # the file the classifier was loaded from (a bundled one already checked)
    info = clf.info
    accuracy = info.get("test_accuracy")
    if accuracy is None and info.get("kind") == "checkpoint":
        accuracy = known_test_accuracy(path)
    if accuracy is None:  # a bundled float16 file: its sidecar has none, its record has it measured through the file
        accuracy = bundled.test_accuracy(model)
    return {
        "model": info["name"],
        "network": str(info.get("model") or path.stem),
        "file": str(model) if bundled.is_bundled(model) else path.name,
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
    # LitServe counts GPUs with nvidia-smi, absent from many containers (0 GPUs: "num_api_servers
    # must be greater than 0"): the count comes from torch, which device_for asked.
    devices = torch.cuda.device_count() if device == "cuda" else "auto"
    clf = load_classifier(model, calibrate=calibrate)  # refuses a bad, unsafe or foreign model file before any worker starts
    info = model_info(model, clf)
    api = ClassifierAPI(str(model), accelerator, max_batch_size, batch_timeout, calibrate)
    server = ls.LitServer(
        api, accelerator=device, devices=devices, workers_per_device=workers, info_path="/litserve/info", model_metadata=info,
        # No max_payload_size: CheckUploads bounds /predict's body, and LitServe's own bound raises
        # from a middleware, outside the exception handlers, which answers a chunked upload with a 500.
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


def listen_address(host: str, port: int) -> str:
    """The address for LitServe's run(), once (host, port) was bound here the way uvicorn binds
    it (SO_REUSEADDR): a taken port or a host LitServe cannot listen on is one ConfigError
    line, not uvicorn's log and exit status 3 or LitServe's ValueError."""
    if not 1024 <= port <= 65535:  # LitServe's range
        raise ConfigError(f"--port {port}: must be in 1024..65535")
    address = host
    if host not in LISTENABLE:
        try:
            found = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except (OSError, UnicodeError, ValueError) as e:
            raise ConfigError(f"--host {host[:100]}: cannot resolve this name ({getattr(e, 'strerror', None) or e})") from None
        address = next((a for a in LISTENABLE if a in found), "")
        if not address:
            raise ConfigError(f"--host {host[:100]}: resolves to {', '.join(sorted(found))}; cifar-serve (LitServe) listens only on "
                              "127.0.0.1 (this machine, or localhost), 0.0.0.0 or :: (every interface)")  # fmt: skip
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port}: already in use on {address}") from None
            raise ConfigError(f"--host {host[:100]} --port {port}: cannot listen there ({e.strerror or e})") from None
    return address


def serve_command(model: str | None, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32, batch_timeout: float = 0.005,
                  workers: int = 1, accelerator: str = "cpu", top_k: int = 5, max_upload_mb: float = 10.0,
                  calibrate: bool = True) -> int:  # fmt: skip
    """cifar-serve: build the server, then serve until Ctrl-C or SIGTERM (which stop the workers too); 0.
    Without a model, the bundled default (``bundled.default_name``)."""
    model = bundled.PREFIX + bundled.default_name() if model is None else model
    if not (0 <= batch_timeout < 60 and 0 < max_upload_mb <= 1024):
        raise ConfigError("--batch-timeout or --max-upload-mb out of range")
    listen_host = listen_address(host, port)  # before the model loads: a taken port fails at once
    server = build_server(model, max_batch_size, batch_timeout, workers, accelerator, top_k, max_upload_mb, calibrate)
    main_pid = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:  # a forked LitServe process: die as SIGTERM means
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt  # LitServe's own shutdown path: it stops its workers too

    signal.signal(signal.SIGTERM, stop)
    print(f"cifar-serve: {bundled.describe(model)} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.run(host=listen_host, port=port, generate_client_file=False, log_level="warning")
    except KeyboardInterrupt:
        pass
    return 0
