"""Serving tuned models: chat backends, an OpenAI-compatible HTTP server and a web UI.

- ``backend``: :class:`~mmtune.serve.backend.ChatBackend`, the one interface the server and the
  UI talk to (a text backend for causal LMs; a multimodal backend for composed models), and
  :func:`~mmtune.serve.backend.load_backend`, which picks one for a model directory.
- ``openai_server``: ``mmtune serve MODEL_DIR`` (FastAPI: ``/v1/models``, ``/v1/chat/completions``).
- ``web``: ``mmtune web`` (gradio: Chat, Train and Reports tabs).
- ``train_job``: a training run in a background thread, with progress and a clean stop.
- ``reports``: finding and reading report directories (demo, continual learning).

Import the submodules directly; this package imports nothing heavy.
"""


def require(module: str, feature: str):
    """Import optional dependency ``module`` for ``feature``, or say which extra installs it."""
    import importlib

    from ..errors import MMTuneError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MMTuneError(f"{feature} needs the '{module.split('.')[0]}' package: pip install 'mmtune[web]'") from None
