"""python scripts/predict.py --help  (same as the cifar-predict console script)"""

import sys

from cifar_lightning.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
