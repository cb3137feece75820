"""Built-in loraserve plugins, each discovered through the ``loraserve`` entry-point group."""
