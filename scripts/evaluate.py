"""python scripts/evaluate.py --help  (same as the cifar-evaluate console script)"""

import sys

from cifar_lightning.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
