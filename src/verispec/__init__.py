"""verispec: lossless speculative decoding for Hugging Face causal LMs."""
from .config import SamplingConfig
from .engine.tree import TokenTree
from .generator import GenerationOutput, SpeculativeGenerator, methods
from .models import LoadedModel, load_model
from .version import __version__  # noqa: F401 (verispec.__version__)

__all__ = [
    "GenerationOutput", "LoadedModel", "SamplingConfig", "SpeculativeGenerator", "TokenTree",
    "load_model", "methods",
]
