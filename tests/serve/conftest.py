"""Fixtures of the serving tests: the tiny model as a chat backend, a tiny composed multimodal
model, and a uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dir():
    from mmtune.models.tiny import ensure_tiny

    return ensure_tiny()


def perturb(model, seed: int = 1, scale: float = 0.1) -> None:
    """The random tiny model repeats one token; noise on its weights makes greedy output varied,
    so that comparing texts means something (as tests/test_chat.py does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def text_backend(tiny_dir):
    from mmtune.inference.models import TextChatModel

    backend = TextChatModel.from_dir(str(tiny_dir), name="tiny")
    perturb(backend.model)
    return backend


@pytest.fixture(scope="session")
def composed_dir(tmp_path_factory):
    """A tiny composed model (tiny LM + tiny SigLIP + tiny Conformer, a `vision` and a `speech`
    LoRA, the default router), saved as `mmtune train` saves one."""
    from mmtune.config import ModelConfig
    from mmtune.multimodal.config import MultimodalConfig
    from mmtune.multimodal.model import build_composed_model

    cfg = MultimodalConfig.model_validate({
        "vision": {}, "audio": {},
        "adapters": [{"name": "vision", "r": 4, "alpha": 8}, {"name": "speech", "r": 4, "alpha": 8}],
        "stages": [{"name": "unused", "sources": [{"path": "builtin:shapes-vqa"}]}],
    })
    out = tmp_path_factory.mktemp("composed") / "model"
    build_composed_model(cfg, ModelConfig(path="builtin:tiny")).save(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0):
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="session")
def run_server():
    """``with run_server(app) as base_url:`` serves a FastAPI app on a free loopback port."""
    return running_server


def _write_continual_report(out):
    """A continual-learning report written by the continual helper's own writer
    (mmtune.continual.report.write_report), from a small made-up accuracy matrix."""
    from mmtune.continual.metrics import summarize
    from mmtune.continual.report import write_report

    R = [[0.92, 0.10, 0.11], [0.61, 0.88, 0.09], [0.45, 0.70, 0.90]]
    b = [0.1, 0.1, 0.1]
    return write_report(out, {"tasks": ["digits 0-3", "digits 4-6", "digits 7-9"], "strategy": "replay",
                              "benchmark": "digits", "scenario": "class", "R": R, "b": b,
                              "metrics": summarize(R, b), "losses": [[2.0, 1.5], [2.1, 1.4], [2.2, 1.2]]})


@pytest.fixture(scope="session")
def write_continual_report():
    return _write_continual_report
