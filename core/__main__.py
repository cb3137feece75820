"""``python -m loraserve`` is the ``loraserve`` command."""

from __future__ import annotations

import sys

from loraserve.cli import main

sys.exit(main())
