"""``python -m cifar_lightning train|evaluate|export|predict|show-data|serve [flags]``: the console
scripts without needing them on PATH."""

from __future__ import annotations

import sys

from cifar_lightning import cli

COMMANDS = {
    "train": cli.train_main,
    "evaluate": cli.evaluate_main,
    "export": cli.export_main,
    "predict": cli.predict_main,
    "show-data": cli.show_data_main,
    "serve": cli.serve_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m cifar_lightning {{{','.join(COMMANDS)}}} [flags...]  (each takes --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
