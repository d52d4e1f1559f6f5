#!/usr/bin/env python
"""Pretrain on every rank: ``python deepy.py train.py CONF...`` starts this once per rank.

The launcher hands each rank the resolved config (``--neox_args``); ranks never read YAML.
"""

from __future__ import annotations

import os
import sys

from neox.errors import NeoXError, format_error


def main() -> None:
    from neox.config import NeoXArgs

    args = NeoXArgs.from_launcher()
    # Imported here: torch and DeepSpeed load on the ranks only.
    from neox.training.pretrain import pretrain, shutdown

    try:
        pretrain(args)
    finally:
        shutdown()


if __name__ == "__main__":
    try:
        main()
    except NeoXError as err:
        if os.environ.get("NEOX_DEBUG") == "1":
            raise
        print(format_error(err), file=sys.stderr)
        sys.exit(err.exit_code)
