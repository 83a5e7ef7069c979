"""python scripts/train.py --help  (same as the cifar-train console script)"""

import sys

from cifar_lightning.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
