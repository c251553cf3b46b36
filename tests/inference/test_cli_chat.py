"""`mmtune chat` on the one session: the reply printed is the session's reply for the same
settings; media flags need a model with the encoder."""

from __future__ import annotations

import io

from mmtune.cli import main
from mmtune.inference.models import TextChatModel
from mmtune.inference.session import ChatSession
from mmtune.inference.turns import GenerationSettings


def test_mmtune_chat_prints_the_sessions_reply(monkeypatch, capsys):
    from mmtune.models.tiny import ensure_tiny

    tiny = str(ensure_tiny())
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 3 + 4?\n/exit\n"))
    assert main(["chat", tiny, "--system", "Be brief.", "--temperature", "0.8", "--top-k", "20", "--seed", "3",
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    session = ChatSession(TextChatModel.from_dir(tiny), system_prompt="Be brief.",
                          settings=GenerationSettings(6, 0.8, 0.9, 3, top_k=20))
    reply = session.send("What is 3 + 4?").text()
    assert reply and f"assistant> {reply}\n" in out
    assert main(["chat", tiny, "--image", "cat.png"]) == 2
    assert "has no vision encoder" in capsys.readouterr().err
