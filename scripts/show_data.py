"""python scripts/show_data.py --help  (same as the cifar-show-data console script)"""

import sys

from cifar_lightning.cli import show_data_main

if __name__ == "__main__":
    sys.exit(show_data_main())
