"""Inference: the one generation loop, the one chat session and what they share.

- ``sampling``: the next token from logits (greedy; temperature, top-k, top-p, a seeded draw).
- ``generate``: the token loop with a KV cache for causal LMs and composed models, and
  streaming token ids as text (stop strings, token counts).
- ``turns``: turns, generation settings, prompts, :class:`~mmtune.inference.turns.InputError`.
- ``context``: the policy for a conversation longer than the context.
- ``models``: the chat models (text, composed) and loading one from a directory.
- ``session``: :class:`~mmtune.inference.session.ChatSession`, used by ``mmtune chat``,
  ``mmtune web`` and ``mmtune serve``.
- ``repl``: the terminal chat loop.

Import the submodules directly: this package imports nothing (``generate`` and ``sampling`` sit
below training in the import layers, tests/test_layers.py).
"""
