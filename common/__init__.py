"""Backend-neutral parts of the Llama 4 stack: configuration, checkpoint remapping, tokenizers."""
