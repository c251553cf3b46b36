"""Serving tuned models: an OpenAI-compatible HTTP server and a web UI, both answering through
:class:`mmtune.inference.session.ChatSession` (as ``mmtune chat`` does) over a chat model from
:func:`mmtune.inference.models.load_chat_model` (text or composed multimodal).

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
