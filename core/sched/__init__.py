"""The scheduling stage: requests, sampling parameters, the paged KV cache and the scheduler."""
