"""cifar-serve: the served API, its upload parser under hostile input, start-up errors, and a real browser on the page."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, call, png_bomb, train_tiny_run
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from benchmarks.harness import free_port, launch_server, stop_server
from cifar_lightning import bundled, load_classifier, serve
from cifar_lightning.cli import export_main, serve_main
from cifar_lightning.images import CLASSES
from cifar_lightning.inference import Classifier

# The tests of the real server: servers in child processes, and the model fixture trains.


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny fast-recipe run (test-time views on) and its ONNX export."""
    root = tmp_path_factory.mktemp("serve")
    tree, run = train_tiny_run(root, "--preset", "94", "--widths", "8,16,16", "--epochs", "1", "--val-size", "0")
    ckpt = run / "checkpoints" / "last.ckpt"
    assert call(export_main, [str(ckpt), "--format", "onnx", "--out", str(root / "m.onnx")]) == 0
    return {"root": root, "tree": tree, "ckpt": ckpt, "onnx": root / "m.onnx", "image": sorted((tree / "test").rglob("*.png"))[0]}


@pytest.fixture(scope="module")
def client(model):  # noqa: ANN201
    from litserve.utils import wrap_litserve_start
    from starlette.testclient import TestClient

    from cifar_lightning.serve import build_server

    server = build_server(model["onnx"], max_batch_size=8, batch_timeout=0.01, max_upload_mb=1)
    with wrap_litserve_start(server) as started, TestClient(started.app) as c:
        for _ in range(200):  # ready once the worker has loaded the model
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        yield c


@pytest.mark.subprocess
def test_a_served_prediction_equals_load_classifier_on_the_same_file(model, client) -> None:
    _, ref = load_classifier(model["onnx"]).predict([model["image"]])
    with open(model["image"], "rb") as f:
        r = client.post("/predict", files={"file": ("x.png", f, "image/png")}, data={"top_k": "10"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == str(model["onnx"]) and len(body["top_k"]) == 10
    served = {t["class"]: t["probability"] for t in body["top_k"]}
    names = load_classifier(model["onnx"]).class_names
    assert body["top_k"][0]["class"] == names[int(ref.argmax())]
    assert all(abs(served[n] - float(p)) < 1e-5 for n, p in zip(names, ref[0], strict=True))
    b64 = base64.b64encode(model["image"].read_bytes()).decode()
    r2 = client.post("/predict", json={"image": b64, "top_k": 3})
    assert r2.status_code == 200 and r2.json()["top_k"] == body["top_k"][:3]


@pytest.mark.subprocess
def test_info_health_and_the_page(model, client) -> None:
    info = client.get("/info").json()
    assert info["model"] == str(model["onnx"]) and info["network"] == "fast"  # named as the page and cifar-predict name it
    assert info["classes"][0] == "airplane" and len(info["sha256"]) == 64
    assert info["test_time_augmentation"] is True and info["tta_level"] == 2
    assert info["test_accuracy"] == pytest.approx(json.loads((model["ckpt"].parent.parent / "results.json").read_text())["test_acc"])
    assert client.get("/health").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<input id=\"file\"" in page.text and "http" not in page.text.split("<script>")[0].lower()


@pytest.mark.skipif("photo" not in bundled.index(), reason="built without the photo model")
def test_info_of_a_bundled_model_gives_the_accuracy_its_record_measured_through_the_file() -> None:
    """A float16 export's sidecar has no test accuracy (the run measured float32); the page and
    /info say what the command line says: the record's figure, measured through that file."""
    info = serve.model_info("pretrained:photo", load_classifier("pretrained:photo"))
    assert info["test_accuracy"] == bundled.index()["photo"]["test_acc"]


def _bad_requests(model, tmp_path: Path) -> dict[str, tuple[dict, int]]:
    good = model["image"].read_bytes()
    bomb = png_bomb(tmp_path / "bomb.png").read_bytes()
    return {
        "not an image": ({"files": {"file": ("a.png", b"hello, not an image", "image/png")}}, 415),
        "truncated image": ({"files": {"file": ("a.png", good[:60], "image/png")}}, 400),
        "empty file": ({"files": {"file": ("a.png", b"", "image/png")}}, 400),
        "empty body": ({"content": b"", "headers": {"content-type": "application/json"}}, 400),
        "wrong field": ({"files": {"image": ("a.png", good, "image/png")}}, 422),
        "over --max-upload-mb": ({"files": {"file": ("big.png", b"\0" * (2 << 20), "image/png")}}, 413),
        "decompression bomb": ({"files": {"file": ("bomb.png", bomb, "image/png")}}, 413),
        "unsupported content type": ({"content": good, "headers": {"content-type": "image/png"}}, 415),
        "invalid JSON": ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        "JSON without image": ({"json": {"picture": "x"}}, 422),
        "bad base64": ({"json": {"image": "%%%not base64%%%"}}, 400),
        "top_k of zero": ({"files": {"file": ("a.png", good, "image/png")}, "data": {"top_k": "0"}}, 400),
        "top_k not a number": ({"json": {"image": base64.b64encode(good).decode(), "top_k": "many"}}, 400),
        # these were 500s: starlette's multipart refusals and int(inf) escaped the middleware
        "two files": ({"files": [("file", ("a.png", good, "image/png")), ("file", ("b.png", good, "image/png"))]}, 400),
        "multipart without boundary": ({"content": b"--B\r\n\r\n--B--", "headers": {"content-type": "multipart/form-data"}}, 400),
        "too many fields": ({"files": {"file": ("a.png", good, "image/png")}, "data": {f"f{i}": "x" for i in range(50)}}, 400),
        "top_k infinite": ({"content": b'{"image": "%s", "top_k": 1e999}' % base64.b64encode(good),
                            "headers": {"content-type": "application/json"}}, 400),
        "top_k true": ({"json": {"image": base64.b64encode(good).decode(), "top_k": True}}, 400),
        "top_k a fraction": ({"json": {"image": base64.b64encode(good).decode(), "top_k": 2.5}}, 400),
    }


@pytest.mark.subprocess
def test_every_bad_upload_is_a_4xx_with_one_error_line_and_the_server_still_answers(model, client, tmp_path: Path) -> None:
    for name, (kwargs, status) in _bad_requests(model, tmp_path).items():
        r = client.post("/predict", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error, name
        with open(model["image"], "rb") as f:
            assert client.post("/predict", files={"file": ("x.png", f, "image/png")}).status_code == 200, f"after {name}"


@pytest.mark.subprocess
def test_a_bad_model_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "m.onnx").write_bytes(b"garbage")
    for model in (tmp_path / "none.onnx", tmp_path / "m.onnx", tmp_path):
        assert call(serve_main, [str(model)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("CI is set but Chromium is not installed: .ci/run installs Debian's chromium")
    return found


@pytest.mark.subprocess
def test_a_real_browser_uploads_an_image_and_reads_the_class(model, tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from benchmarks.harness import launch_server

    server, url = launch_server(model["onnx"], cwd=REPO)
    try:
        expected = load_classifier(model["onnx"]).predict([model["image"]])[0][0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])  # fmt: skip
            page = browser.new_page(viewport={"width": 390, "height": 760})  # a phone's width
            page.goto(f"{url}/")
            # The first screen: no image boxes (broken or empty) before an image is chosen.
            assert not page.is_visible("#original") and not page.is_visible("#seen") and not page.is_visible("#panel")
            page.set_input_files("#file", str(model["image"]))
            page.wait_for_selector("#top1[data-class]", timeout=30_000)
            shown = page.get_attribute("#top1", "data-class")
            assert shown == expected
            assert page.locator(".bar").count() == 5
            assert page.evaluate("document.getElementById('seen').naturalWidth") == 32
            shot = Path(os.environ.get("CIFAR_SERVE_SCREENSHOT", tmp_path / "serve.png"))
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5000
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.subprocess
def test_probabilities_served_under_concurrent_load_match_one_by_one(model, client) -> None:
    """Requests batched together get the answers they get alone."""
    import concurrent.futures

    files = sorted((model["tree"] / "test").rglob("*.png"))[:16]
    _, ref = load_classifier(model["onnx"]).predict(files)

    def ask(path: Path) -> list[float]:
        r = client.post("/predict", files={"file": ("x.png", path.read_bytes(), "image/png")}, data={"top_k": "10"})
        by_class = {t["class"]: t["probability"] for t in r.json()["top_k"]}
        return [by_class[c] for c in load_classifier(model["onnx"]).class_names]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = torch.tensor(list(pool.map(ask, files)))
    assert torch.allclose(got, ref, atol=1e-5)
    assert np.isfinite(got.numpy()).all()
    Image.open(files[0]).close()


# ----------------------------------------------------------------------------- the upload parser in-process


# These run the served app's real ASGI stack (LitServe's FastAPI app with its middleware and
# exception handlers) in-process, with the model behind /predict swapped for an echo: the parser is
# what they test, and no worker needs to start.


FUZZ = settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


LIMIT_MB = 1


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNG, WHITE_PNG = _png(90), _png(255)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained seed network saved as a checkpoint, built without Lightning (fast)."""
    from cifar_lightning import models

    net = models.build("seed")
    path = tmp_path_factory.mktemp("serve_hardening") / "seed.ckpt"
    hparams = {"model": "seed", "num_classes": 10, "class_names": list(CLASSES)}
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hparams}, path)
    return path


@pytest.fixture(scope="module")
def parser_app(tiny_model: Path):  # noqa: ANN201
    """build_server's app, every middleware and handler as served, with /predict answered by an
    echo of what CheckUploads passed on."""
    app = serve.build_server(tiny_model, max_upload_mb=LIMIT_MB).app

    async def echo(request: Request) -> Response:
        payload = await request.json()
        return JSONResponse({"pixels": len(base64.b64decode(payload["pixels"])), "top_k": payload["top_k"]})

    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/predict"]
    app.add_route("/predict", echo, methods=["POST"])
    return app


@pytest.fixture(scope="module")
def parser_client(parser_app) -> TestClient:  # noqa: ANN001
    return TestClient(parser_app)  # no `with`: LitServe's lifespan (its worker queues) is not needed


def assert_answered(r) -> None:  # noqa: ANN001
    """A 2xx that passed the parser on, or a 4xx with one line of {"error": ...}; never a 5xx."""
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error, r.text[:300]
    else:
        body = r.json()
        assert body["pixels"] == 32 * 32 * 3 and 1 <= body["top_k"] <= serve.MAX_TOP_K, body


# ----------------------------------------------------------------------------- generated requests


TOP_K_TOKENS = ["3", "3.0", "2.5", "0", "-1", "101", "1e999", "-1e999", "Infinity", "-Infinity", "NaN", "true", "false", "null",
                '"7"', '"7.5"', '" 4 "', '"1e3"', '"many"', '""', "[3]", '{"k": 3}', "1" + "0" * 400, '"' + "9" * 5000 + '"',
                "1e308", "5E0", "-0"]  # fmt: skip


PARTS = st.tuples(
    st.sampled_from(["file", "top_k", "preview", "image", "x", ""]) | st.text(max_size=6),
    st.sampled_from([None, "a.png", "", "../../etc/passwd", "x\r\ny"]),  # a filename makes it a file part
    st.sampled_from([PNG, WHITE_PNG, PNG[:40], b"", b"5", b"1e999", b"true", b"\xff\xfe", b"--B\r\n"]) | st.binary(max_size=40),
)


@st.composite
def multipart_requests(draw: st.DrawFn) -> tuple[bytes, str]:
    """Any number of parts (duplicates too), with the boundary right, wrong, odd or missing."""
    boundary = draw(st.sampled_from(["B", "----x7", "a" * 80, "wei rd", "é"]))
    lines = []
    for name, filename, content in draw(st.lists(PARTS, max_size=14)):
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        if draw(st.booleans()):
            disposition = draw(st.sampled_from(["form-data", "attachment; name=file", 'form-data; name="file"; filename']))
        lines.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode() + b"Content-Type: image/png\r\n\r\n" + content)
    body = b"\r\n".join(lines) + f"\r\n--{boundary}--\r\n".encode() * draw(st.integers(0, 2))
    if draw(st.booleans()):  # damage it: cut it anywhere
        body = body[: draw(st.integers(0, len(body)))]
    header = draw(st.sampled_from([f"boundary={boundary}", f'boundary="{boundary}"', "", "boundary=", "boundary=other",
                                   f"charset=utf-8; boundary={boundary}", f"boundary={boundary}; boundary=x"]))  # fmt: skip
    return body, "multipart/form-data" + (f"; {header}" if header else "")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def json_requests(draw: st.DrawFn) -> bytes:
    """JSON with an image good or bad, and top_k as any token, including ones json.loads reads as
    infinities and NaN; or any JSON at all."""
    if draw(st.integers(0, 4)) == 0:
        return json.dumps(draw(JSON_VALUES)).encode()
    image = draw(st.sampled_from([base64.b64encode(PNG).decode(), "data:image/png;base64," + base64.b64encode(PNG).decode(),
                                  base64.b64encode(PNG[:50]).decode(), "%%", ""]))  # fmt: skip
    fields = [f'"image": {json.dumps(image)}'] if draw(st.integers(0, 5)) else [f'"image": {json.dumps(draw(JSON_VALUES))}']
    for _ in range(draw(st.integers(0, 2))):  # duplicate keys: the last one counts
        token = draw(st.sampled_from(TOP_K_TOKENS) | JSON_VALUES.map(json.dumps))
        fields.append(f'"top_k": {token}')
    if draw(st.booleans()):
        fields.append(f'"preview": {json.dumps(draw(JSON_VALUES))}')
    return ("{" + ", ".join(draw(st.permutations(fields))) + "}").encode()


@FUZZ
@given(multipart_requests())
@example(upload=(b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + PNG + b"\r\n"
                  b'--B\r\nContent-Disposition: form-data; name="file"; filename="b.png"\r\n\r\n' + PNG + b"\r\n--B--\r\n",
                  "multipart/form-data; boundary=B"))  # two files: starlette's HTTPException escaped as a 500
@example(upload=(b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + PNG + b"\r\n--B--\r\n",
                  "multipart/form-data"))  # no boundary  # fmt: skip
def test_any_multipart_upload_is_answered_2xx_or_4xx_never_5xx(parser_client: TestClient, upload: tuple[bytes, str]) -> None:
    body, content_type = upload
    assert_answered(parser_client.post("/predict", content=body, headers={"content-type": content_type.encode()}))  # é: bytes


@FUZZ
@given(json_requests())
@example(body=b'{"image": "%s", "top_k": 1e999}' % base64.b64encode(PNG))  # int(inf): OverflowError, a 500
@example(body=b'{"image": "%s", "top_k": Infinity}' % base64.b64encode(PNG))
@example(body=b'{"image": "%s", "top_k": NaN}' % base64.b64encode(PNG))
def test_any_json_upload_is_answered_2xx_or_4xx_never_5xx(parser_client: TestClient, body: bytes) -> None:
    assert_answered(parser_client.post("/predict", content=body, headers={"content-type": "application/json"}))


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["application/json", "multipart/form-data; boundary=B", "multipart/form-data",
                                                 "multipart/mixed", "text/plain", "", "application/json; charset=utf-16"]))  # fmt: skip
def test_any_bytes_with_any_content_type_are_answered_2xx_or_4xx(parser_client: TestClient, body: bytes, content_type: str) -> None:
    assert_answered(parser_client.post("/predict", content=body, headers={"content-type": content_type} if content_type else {}))


@pytest.mark.parametrize("top_k", [True, False, 2.5, 1e999, float("nan"), "1e3", [3], {"k": 3}, 10**30, "9" * 5000])
def test_a_top_k_that_is_not_a_whole_number_in_range_is_a_400(parser_client: TestClient, top_k: object) -> None:
    r = parser_client.post("/predict", content=json.dumps({"image": base64.b64encode(PNG).decode(), "top_k": top_k}).encode(),
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "top_k" in r.json()["error"], r.text


@pytest.mark.parametrize("top_k", [3, 3.0, "3", " 3 "])
def test_a_whole_top_k_as_number_or_text_is_taken(parser_client: TestClient, top_k: object) -> None:
    r = parser_client.post("/predict", json={"image": base64.b64encode(PNG).decode(), "top_k": top_k})
    assert r.status_code == 200 and r.json()["top_k"] == 3, r.text


def test_a_second_file_many_fields_or_no_boundary_are_400s(parser_client: TestClient) -> None:
    two = parser_client.post("/predict", files=[("file", ("a.png", PNG, "image/png")), ("file", ("b.png", PNG, "image/png"))])
    many = parser_client.post("/predict", files={"file": ("a.png", PNG, "image/png")}, data={f"f{i}": "x" for i in range(200)})
    body = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + PNG + b"\r\n--B--\r\n"
    bare = parser_client.post("/predict", content=body, headers={"content-type": "multipart/form-data"})
    for r in (two, many, bare):
        assert r.status_code == 400 and "\n" not in r.json()["error"], r.text
    assert parser_client.post("/predict", files={"file": ("a.png", PNG, "image/png")}).status_code == 200


# ----------------------------------------------------------------------------- size


def _post_chunked(app, content_type: str, total_mb: int) -> tuple[int, dict, int]:  # noqa: ANN001
    """POST /predict with a body of total_mb 1 MB chunks and no Content-Length (as chunked
    transfer encoding arrives over ASGI): (status, JSON body, bytes the app read)."""
    chunk = b"A" * (1 << 20)
    sent, messages = 0, []

    async def receive() -> dict:
        nonlocal sent
        sent += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": sent < total_mb << 20}

    async def send(message: dict) -> None:
        messages.append(message)

    headers = [(b"content-type", content_type.encode()), (b"transfer-encoding", b"chunked")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 5000), "headers": headers}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return messages[0]["status"], json.loads(body), sent


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; boundary=B"])
def test_a_chunked_body_over_the_limit_is_a_413_read_no_further(parser_app, content_type: str) -> None:  # noqa: ANN001
    status, body, read = _post_chunked(parser_app, content_type, total_mb=50)
    assert status == 413 and "limit" in body["error"], body
    assert read <= (LIMIT_MB + 1) << 20  # refused as soon as it passed the limit, not read whole


# ----------------------------------------------------------------------------- one bad image in a batch


def nan_on_white(x: torch.Tensor) -> torch.Tensor:
    """A network that gives finite logits, except NaN for an all-white image."""
    logits = x.flatten(1)[:, :10].clone()
    logits[x.flatten(1).min(1).values > 1.5] = float("nan")  # white, normalised, is about 2
    return logits


def _item(png: bytes, top_k: int = 10) -> dict:
    pixels = serve.decode_upload(png)
    return {"pixels": base64.b64encode(pixels.tobytes()).decode(), "top_k": top_k}


class SilentNaN(Classifier):
    """A classifier whose probabilities come back NaN for white images without raising."""

    def probabilities(self, batch: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        probs = self.to_probabilities(self.logits(batch).nan_to_num(0.0))
        probs[batch.flatten(1).min(1).values == 255] = float("nan")
        return probs


@pytest.mark.parametrize("kind", [Classifier, SilentNaN], ids=["raises", "returns NaN"])
def test_non_finite_scores_on_one_image_answer_that_request_alone(kind: type) -> None:
    api = serve.ClassifierAPI("fake.ckpt")
    api.clf, api.name = kind(nan_on_white, CLASSES), "fake"
    items = [_item(PNG), _item(WHITE_PNG), _item(_png(20))]
    responses = [api.encode_response(y) for y in api.unbatch(api.predict(api.batch([api.decode_request(r) for r in items])))]
    assert [r.status_code for r in responses] == [200, 422, 200]
    assert json.loads(responses[1].body) == {"error": serve.NON_FINITE}
    for png, r in zip((PNG, _png(20)), (responses[0], responses[2]), strict=True):  # the answer each gets alone
        alone = api.clf.probabilities(torch.from_numpy(serve.decode_upload(png)).permute(2, 0, 1)[None])
        assert json.loads(r.body)["top_k"] == api.clf.top_k(alone, 10)[0]


class NaNOnWhiteAPI(serve.ClassifierAPI):
    """The served API with the model giving NaN on white images, and each answer saying how many
    requests its batch held (pickled by reference into LitServe's spawned worker)."""

    def setup(self, device: str) -> None:
        super().setup(device)
        self.clf.network = nan_on_white

    def predict(self, inputs: list[dict] | dict) -> list[dict]:
        return [{**y, "batch": len(inputs)} for y in super().predict(inputs)]


@pytest.mark.subprocess  # LitServe's worker is a spawned process
def test_a_batch_with_one_non_finite_image_still_answers_the_others(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from litserve.utils import wrap_litserve_start

    monkeypatch.setattr(serve, "ClassifierAPI", NaNOnWhiteAPI)
    server = serve.build_server(tiny_model, max_batch_size=4, batch_timeout=10.0)  # a batch waits for all four
    pngs = [PNG, WHITE_PNG, _png(20), _png(200)]
    with wrap_litserve_start(server) as started, TestClient(started.app) as c:
        deadline = time.monotonic() + 120
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda png: c.post("/predict", files={"file": ("x.png", png, "image/png")}), pngs))
    assert [r.status_code for r in answers] == [200, 422, 200, 200], [r.text for r in answers]
    assert answers[1].json()["error"] == serve.NON_FINITE
    assert all(r.json()["batch"] == 4 and len(r.json()["top_k"]) == 5 for r in answers if r.status_code == 200)


# ----------------------------------------------------------------------------- start-up


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert call(serve_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cifar-serve: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_start_up_errors_are_one_line_and_exit_2(tiny_model: Path, taken_port: int, capsys, monkeypatch) -> None:  # noqa: ANN001
    model = str(tiny_model)
    assert f"--port {taken_port}: already in use on 127.0.0.1" in _one_line_exit_2([model, "--port", str(taken_port)], capsys)
    assert "already in use" in _one_line_exit_2([model, "--port", str(taken_port), "--host", "localhost"], capsys)
    assert "cannot resolve" in _one_line_exit_2([model, "--host", "no-such-host.invalid", "--port", str(free_port())], capsys)
    assert "cannot resolve" in _one_line_exit_2([model, "--host", "a" * 300, "--port", str(free_port())], capsys)
    assert "listens only on" in _one_line_exit_2([model, "--host", "::1", "--port", str(free_port())], capsys)
    assert "1024..65535" in _one_line_exit_2([model, "--port", "80"], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("cuda", "gpu"):
        line = _one_line_exit_2([model, "--accelerator", accelerator, "--port", str(free_port())], capsys)
        assert "no CUDA GPU" in line


def test_localhost_is_served_on_127_0_0_1(tiny_model: Path) -> None:
    assert serve.listen_address("localhost", free_port()) == "127.0.0.1"
    assert serve.listen_address("127.0.0.1", free_port()) == "127.0.0.1"


def test_cuda_devices_come_from_torch_not_nvidia_smi(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch sees a GPU but nvidia-smi is absent, LitServe alone would count 0 devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert serve.build_server(tiny_model, accelerator="cuda").devices == [["cuda:0"]]


@pytest.mark.subprocess
def test_a_taken_port_and_a_missing_gpu_exit_2_with_one_line_from_the_command(tiny_model: Path, taken_port: int) -> None:
    command = [sys.executable, "-m", "cifar_lightning", "serve", str(tiny_model)]
    cases = {"already in use on 127.0.0.1": ["--port", str(taken_port)],
             "no CUDA GPU": ["--accelerator", "cuda", "--port", str(free_port())]}  # fmt: skip
    for expected, flags in cases.items():
        done = subprocess.run([*command, *flags], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1 and expected in err[0], (done.returncode, done.stderr)


@pytest.mark.subprocess
def test_the_real_server_on_localhost_refuses_hostile_uploads_and_still_answers(tiny_model: Path) -> None:
    import httpx

    server, url = launch_server(tiny_model, "--host", "localhost", "--max-upload-mb", "1", cwd=REPO)
    try:

        def fifty_mb() -> Iterator[bytes]:
            yield b'{"image": "'
            for _ in range(50):
                yield b"A" * (1 << 20)
            yield b'"}'

        def post(**kwargs: object) -> httpx.Response:
            with httpx.Client(timeout=60) as c:  # a fresh connection each: a refused body closes one
                return c.post(f"{url}/predict", **kwargs)

        r = post(content=fifty_mb(), headers={"content-type": "application/json"})  # Transfer-Encoding: chunked
        assert r.status_code == 413 and "limit" in r.json()["error"], r.text
        bad = [{"files": [("file", ("a.png", PNG, "image/png")), ("file", ("b.png", PNG, "image/png"))]},
               {"content": b"--B\r\n\r\n--B--", "headers": {"content-type": "multipart/form-data"}},
               {"files": {"file": ("a.png", PNG, "image/png")}, "data": {f"f{i}": "x" for i in range(100)}},
               {"content": b'{"image": "%s", "top_k": 1e999}' % base64.b64encode(PNG), "headers": {"content-type": "application/json"}},
               {"content": b'{"image": "%s", "top_k": Infinity}' % base64.b64encode(PNG), "headers": {"content-type": "application/json"}},
               {"json": {"image": base64.b64encode(PNG).decode(), "top_k": True}}]  # fmt: skip
        for kwargs in bad:
            r = post(**kwargs)
            assert 400 <= r.status_code < 500 and "\n" not in r.json()["error"], (kwargs.keys(), r.status_code, r.text)
        r = post(files={"file": ("a.png", PNG, "image/png")}, data={"top_k": "3"})
        assert r.status_code == 200 and len(r.json()["top_k"]) == 3, r.text
    finally:
        stop_server(server)
