"""Kernel plans shipped with loraserve, one JSON file per device name (see ``backend_triton.plans``)."""
