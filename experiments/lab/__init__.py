"""Lab code: what the CLIs in experiments/ share, kept out of the library.

Benchmark harnesses and timing (`speed`, `benchmarking`), the studies
(`agreement`, `activations`), the paper's sweep list (`paper`), the result
writers (`results`), model loading with the SmolLM2 default (`models`) and
the torch reference perplexity (`hf_reference`). Imports run one way:
experiments/ -> quarot_jax/ -> pallas_kernels/.
"""
