#!/usr/bin/env python
"""Pretrain on every rank: ``python deepy.py train.py CONF...`` starts this once per rank.

deepy.py hands each rank the resolved config (``--neox_args_file``, neox.handoff); ranks never read YAML.
"""

from __future__ import annotations

import sys

from neox.errors import exit_code_of


def main() -> None:
    from neox.handoff import rank_args

    args = rank_args()
    # Imported here: torch and DeepSpeed load on the ranks only.
    from neox.training.pretrain import pretrain

    pretrain(args)  # process groups are released at exit (pretrain.shutdown, registered with atexit)


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
