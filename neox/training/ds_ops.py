"""DeepSpeed's compiled ops: which one a run is about to build, said in one line before the build starts.

``scripts/install.sh`` installs DeepSpeed without compiling any op (``DS_BUILD_OPS=0``), so an op DeepSpeed
loads is built on first use by torch.utils.cpp_extension (a C++ compiler and ninja are needed then) and
cached under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later runs load the cache.
neox avoids the ops that buy it nothing: the CPU all-reduce op ``deepspeed_shm_comm`` is never built
(``pretrain.use_cpu_accelerator_without_shm_op``), ZeRO CPU offload runs torch AdamW unless ``cpu_adam``
was prebuilt or ``optimizer.type: cpu_adam`` asks for DeepSpeed's CPU Adam (``neox.training.optim``).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TextIO

from neox.errors import ConfigError

# first-build time on 2 CPU cores (DeepSpeed 0.19.8, torch 2.13, g++ 12: 173 s of compiler CPU time over its two
# sources, built in parallel)
BUILD_SECONDS = {"cpu_adam": 90}


def is_cached(name: str) -> bool:
    """A previous run's JIT build of ``name`` is in torch's extension cache (so loading it is quick)."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = _get_build_directory(name, verbose=False)
    return os.path.isfile(os.path.join(build_dir, f"{name}.so"))


def announce_build(name: str, stream: TextIO | None = None, *, prebuilt: bool, key: str = "optimizer.type") -> bool:
    """Print the one line when loading DeepSpeed's ``name`` op will compile it; True if it will.

    ``prebuilt``: DeepSpeed was installed with the op (``engine.installed_op``). Only the first rank on each node prints: the other ranks wait for the same build (DeepSpeed locks it).
    Without a compiler or ninja the build would fail in a traceback: a one-line ConfigError naming ``key``.
    """
    if prebuilt or is_cached(name):
        return False
    missing = [tool for tool in (os.environ.get("CXX", "c++"), "ninja") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"{key}: needs DeepSpeed's {name} op, which is not prebuilt and needs {' and '.join(missing)} "
                          f"to compile (install a C++ compiler and ninja, or install DeepSpeed with DS_BUILD_"
                          f"{name.upper()}=1)")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        seconds = BUILD_SECONDS.get(name)
        about = f", about {seconds} s the first time" if seconds else ", the first time only"
        print(f"neox: compiling DeepSpeed's {name} op (needs a C++ compiler{about})", file=stream or sys.stderr,
              flush=True)
    return True
