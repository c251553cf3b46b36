"""mmtune: fine-tune Hugging Face language models, give them eyes and ears, and keep them learning."""

__version__ = "0.1.0"
