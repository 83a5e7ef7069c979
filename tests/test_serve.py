"""cifar-serve: the API in-process (LitServe's workers, Starlette's test client), every bad upload
a 4xx with {"error": ...} after which the server still answers, and a real browser on the page."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, call, png_bomb, train_tiny_run
from PIL import Image

from cifar_lightning import load_classifier
from cifar_lightning.cli import export_main, serve_main

pytestmark = pytest.mark.subprocess  # servers in child processes; the model fixture trains


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


def test_info_health_and_the_page(model, client) -> None:
    info = client.get("/info").json()
    assert info["model"] == str(model["onnx"]) and info["network"] == "fast"  # named as the page and cifar-predict name it
    assert info["classes"][0] == "airplane" and len(info["sha256"]) == 64
    assert info["test_time_augmentation"] is True and info["tta_level"] == 2
    assert info["test_accuracy"] == pytest.approx(json.loads((model["ckpt"].parent.parent / "results.json").read_text())["test_acc"])
    assert client.get("/health").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<input id=\"file\"" in page.text and "http" not in page.text.split("<script>")[0].lower()


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


def test_every_bad_upload_is_a_4xx_with_one_error_line_and_the_server_still_answers(model, client, tmp_path: Path) -> None:
    for name, (kwargs, status) in _bad_requests(model, tmp_path).items():
        r = client.post("/predict", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error, name
        with open(model["image"], "rb") as f:
            assert client.post("/predict", files={"file": ("x.png", f, "image/png")}).status_code == 200, f"after {name}"


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
