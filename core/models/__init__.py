"""Model architectures (registered through ``loraserve_register_models``)."""
