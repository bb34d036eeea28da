#!/usr/bin/env python3
"""Benchmark localbot against raw llama-cpp-python: see ``scripts/bench/__init__.py``.

    python scripts/bench.py [--quick] [--restart] [--model X.gguf]

Python puts this file's folder first on ``sys.path``, and a package there wins over a module of
the same name, so ``import bench`` below is the ``scripts/bench/`` package, not this file.
"""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
