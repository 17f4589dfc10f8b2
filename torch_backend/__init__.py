"""Llama 4 inference in PyTorch (CUDA, MPS, CPU): the same model and API as `mlx_llm`."""

from torch_backend.batch import BatchGenerator, batch_generate
from torch_backend.generate import generate, generate_step, stream_generate
from torch_backend.load import load, load_model, load_tokenizer
from torch_backend.model import Transformer

__all__ = ["BatchGenerator", "Transformer", "batch_generate", "generate", "generate_step", "load", "load_model",
           "load_tokenizer", "stream_generate"]
