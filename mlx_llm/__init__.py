"""Llama 4 inference in MLX (Apple silicon first; also runs on the Linux CPU)."""

from mlx_llm.batch import BatchGenerator, batch_generate
from mlx_llm.generate import generate, generate_step, stream_generate
from mlx_llm.load import load, load_model, load_tokenizer
from mlx_llm.model import Transformer

__all__ = ["BatchGenerator", "Transformer", "batch_generate", "generate", "generate_step", "load", "load_model",
           "load_tokenizer", "stream_generate"]
