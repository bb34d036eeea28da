#!/usr/bin/env python3
"""Download a GGUF model into models/: the same as ``python -m localbot.download``.

Works from a source checkout without installing localbot. See ``--help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localbot.download import main

if __name__ == "__main__":
    raise SystemExit(main())
