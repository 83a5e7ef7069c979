"""Issue 34's ensemble lever, on finished models (no training): ``pretrained:94`` beside a robust
model, their calibrated probabilities averaged with weight w on the first, then one temperature
fitted on the average (log-probabilities as logits).

    python -m research.photo_ensemble --data-dir ../shared/data/cifar10 --robust CKPT \
        --out docs/speed/photo95/test/ensemble_seed8.json

The rule, fixed before this script first ran (2026-12-06): both models held out the same 2,000
images (split seed 0, ``perm[:2000]``); w is chosen among 0, 0.1, ..., 1 on those images alone, as
the w with the best mean of clean and JPEG-75 accuracy among those with clean accuracy at least
that of ``pretrained:94`` alone minus 0.3 points (none: the best mean). The temperature is fitted
on the same images, clean and JPEG-75 copies (``--calib-jpeg``'s choice). The test rows are
reported for every w; only the chosen one is a result, the others show the trade-off.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cifar_lightning import corruptions as corruption
from cifar_lightning.calibration import accuracy, apply_temperature, ece, fit_temperature
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.inference import load_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--base", default="pretrained:94")
    p.add_argument("--robust", required=True)
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    models = [load_classifier(args.base), load_classifier(args.robust)]
    dm = CIFAR10DataModule(data_dir=args.data_dir, val_size=args.held_out)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    sets = {"held": dm.val_set.images, "test": dm.test_set.images}
    sets |= {f"{k}_jpeg75": corruption.jpeg(v, 75) for k, v in list(sets.items())}
    probs = {k: [m.to_probabilities(m.logits(v, 500)).double() for m in models] for k, v in sets.items()}
    held_y, test_y = dm.val_set.labels, dm.test_set.labels

    def mix(k: str, w: float) -> torch.Tensor:
        return (w * probs[k][0] + (1 - w) * probs[k][1]).clamp_min(1e-12).log()

    rows = []
    for w in [i / 10 for i in range(11)]:
        t = fit_temperature(torch.cat([mix("held", w), mix("held_jpeg75", w)]), torch.cat([held_y, held_y]))
        row = {"w_base": w, "temperature": round(t, 4)}
        for k, y in (("held", held_y), ("held_jpeg75", held_y), ("test", test_y), ("test_jpeg75", test_y)):
            lg = apply_temperature(mix(k, w), t)
            row[f"{k}_acc"], row[f"{k}_ece"] = round(accuracy(lg, y), 4), round(ece(lg.softmax(-1), y), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    floor = rows[-1]["held_acc"] - 0.003
    ok = [r for r in rows if r["held_acc"] >= floor] or rows
    pick = max(ok, key=lambda r: (r["held_acc"] + r["held_jpeg75_acc"]) / 2)
    args.out.write_text(json.dumps({"base": args.base, "robust": args.robust, "pick": pick["w_base"], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
