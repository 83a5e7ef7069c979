"""The README's screenshot of the cifar-serve page: serve MODEL, open the page in headless
Chromium at a phone's width, upload IMAGE through the file input, save the page as PNG.

    python -m research.serve_screenshot model.onnx ../shared/data/cifar10/test/cat/0000.png docs/serve.png
"""

from __future__ import annotations

import argparse
import shutil

from playwright.sync_api import sync_playwright

from benchmarks.harness import launch_server, stop_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("out")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args()
    server, url = launch_server(args.model)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])  # fmt: skip
            page = browser.new_page(viewport={"width": 560, "height": 640})
            page.goto(f"{url}/")
            page.set_input_files("#file", args.image)
            page.wait_for_selector("#top1[data-class]", timeout=60_000)
            page.screenshot(path=args.out, full_page=True)
            print(args.out, page.inner_text("#top1"))
            browser.close()
    finally:
        stop_server(server, timeout=30)


if __name__ == "__main__":
    main()
