"""Issue 34's "another encoder": a model's accuracy and ECE on JPEG-75 copies of the test set in
each of Pillow's chroma layouts (4:2:0 is what ``--corruptions`` uses), at the temperatures given.

    python -m research.jpeg_layouts --data-dir ../shared/data/cifar10 --model pretrained:photo --t 0.4896 0.503
"""

from __future__ import annotations

import argparse
import json

from cifar_lightning.calibration import accuracy, apply_temperature, ece
from cifar_lightning.corruptions import jpeg
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.inference import load_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="pretrained:photo")
    p.add_argument("--t", type=float, nargs="+", required=True, help="temperatures to score at")
    args = p.parse_args()
    dm = CIFAR10DataModule(data_dir=args.data_dir)
    dm.prepare_data()
    dm.setup("test")
    x, y = dm.test_set.images, dm.test_set.labels
    clf = load_classifier(args.model, calibrate=False)
    for name, imgs in [("clean", x), *((f"jpeg75 {s}", jpeg(x, 75, s)) for s in ("4:2:0", "4:2:2", "4:4:4"))]:
        lg = clf.logits(imgs, 500).double()
        eces = {str(t): round(ece(apply_temperature(lg, t).softmax(-1), y), 4) for t in args.t}
        print(json.dumps({"copy": name, "acc": round(accuracy(lg, y), 4), "ece_at_t": eces}), flush=True)


if __name__ == "__main__":
    main()
