"""Data engine: record formats, sources and mixtures, chat templates, tokenization, packing."""
