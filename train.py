#!/usr/bin/env python
"""Pretrain on every rank: ``python deepy.py train.py CONF...`` starts this once per rank.

The launcher hands each rank the resolved config (``--neox_args``); ranks never read YAML.
"""

from __future__ import annotations

import sys

from neox.errors import exit_code_of


def main() -> None:
    from neox.config import NeoXArgs

    args = NeoXArgs.from_launcher()
    # Imported here: torch and DeepSpeed load on the ranks only.
    from neox.training.pretrain import pretrain

    pretrain(args)  # process groups are released at exit (pretrain.shutdown, registered with atexit)


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
