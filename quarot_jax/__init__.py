"""quarot-jax: QuaRot rotated low-bit inference for LLaMA-family models.

The notebook API. Everything else lives in the submodules.
"""

# Loading and saving.
from quarot_jax.checkpoint import load
from quarot_jax.checkpoint import load_params
from quarot_jax.checkpoint import load_tokenizer
from quarot_jax.checkpoint import save_params
from quarot_jax.config import LlamaConfig

# Rotating and quantizing.
from quarot_jax.quarot import quantize
from quarot_jax.quarot import QuaRotConfig

# Running.
from quarot_jax.generation import generate
from quarot_jax.model import forward
from quarot_jax.model import RunOptions
