"""python scripts/export.py --help  (same as the cifar-export console script)"""

import sys

from cifar_lightning.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
