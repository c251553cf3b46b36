"""mmtune: fine-tune Hugging Face language models, give them eyes and ears, and keep them learning."""

__version__ = "0.1.0"

# The recipe schema first: the section modules (continual, encoders, distributed, multimodal)
# import ``Section`` from it and it imports them back at its end, which only resolves when
# config.py starts the cycle, whichever mmtune module is imported first.
from . import config as _config  # noqa: E402,F401
