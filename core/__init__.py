"""loraserve: serve one base LLM with many LoRA adapters at once.

``from loraserve import hookimpl`` is all a plugin needs to implement hooks. Importing this
package is cheap: torch, the model code and the HTTP stack are imported only where they are used.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("loraserve")

__all__ = ["hookimpl", "__version__"]
