"""The model-runner stage: one forward step, CUDA graphs, the sampler and attention over the paged cache."""
