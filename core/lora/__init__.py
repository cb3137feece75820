"""LoRA: adapter weights, the backend and eviction contracts, pools and the adapter manager."""
