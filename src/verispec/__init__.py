"""verispec: lossless speculative decoding for Hugging Face causal LMs."""
from .config import SamplingConfig
from .drafters import methods
from .engine.tree import TokenTree
from .generator import GenerationOutput, SpeculativeGenerator
from .models import LoadedModel, load_model

__all__ = [
    "GenerationOutput", "LoadedModel", "SamplingConfig", "SpeculativeGenerator", "TokenTree",
    "load_model", "methods",
]
__version__ = "0.1.0"
