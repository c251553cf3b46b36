"""The context policy: the oldest whole exchanges go first, system turns stay, no turn is cut,
media go with their turn, and only a last message that alone is over the limit is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mmtune.data.templates import get_template
from mmtune.inference.context import Limits, exchanges, fit
from mmtune.inference.models import ComposedChatModel, TextChatModel
from mmtune.inference.session import ChatSession
from mmtune.inference.turns import GenerationSettings, InputError, Turn


def words(turns):
    """A prompt of one token per word plus two per turn (a template's overhead)."""
    return SimpleNamespace(ids=[0] * sum(len(t.text.split()) + 2 for t in turns))


def conversation():
    turns = [Turn("system", "be brief")]
    for i in range(5):
        turns += [Turn("user", f"question {i} " + "w " * i), Turn("assistant", f"answer {i}")]
    return turns + [Turn("user", "the last question")]


def test_exchanges_start_at_user_turns():
    turns = [Turn("system", "s"), Turn("assistant", "hello"), Turn("user", "a"), Turn("user", "b"),
             Turn("assistant", "c"), Turn("system", "mid"), Turn("user", "d")]
    head, units = exchanges(turns)
    assert head == turns[:1]
    assert units == [turns[1:2], turns[2:3], turns[3:6], turns[6:]]


@pytest.mark.parametrize("budget", range(8, 60, 3))
def test_drops_the_oldest_whole_exchanges_and_no_more(budget):
    turns = conversation()
    limits = Limits(budget, budget + 20)
    fitted = fit(turns, words, limits)
    kept = fitted.turns
    assert kept[0] is turns[0]  # the system prompt stays
    assert kept[1:] == turns[1 + fitted.dropped:]  # a suffix of whole turns, none cut
    assert all(a is b for a, b in zip(kept[1:], turns[1 + fitted.dropped:]))
    assert kept[1].role == "user" and fitted.dropped % 2 == 0
    assert len(fitted.prompt.ids) == len(words(kept).ids)
    if len(kept) > 2:  # more than the last exchange kept: it fits, and one exchange more would not
        assert len(fitted.prompt.ids) <= budget
    if fitted.dropped:
        assert len(words([turns[0]] + turns[1 + fitted.dropped - 2:]).ids) > budget


def test_the_last_message_alone_over_the_budget_is_answered_over_the_limit_refused():
    turns = conversation()
    last = len(words([turns[0], turns[-1]]).ids)
    fitted = fit(turns, words, Limits(last - 1, last))  # fits the limit only: reply cut, not refused
    assert fitted.turns == [turns[0], turns[-1]] and fitted.dropped == len(turns) - 2
    with pytest.raises(InputError, match="too long") as e:
        fit(turns, words, Limits(last - 2, last - 1), context_length=99)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages" and "context 99" in str(e.value)
    assert fit(turns, words, Limits(None, None)).dropped == 0


def test_limits_of_a_context():
    assert Limits.of(100, 30) == Limits(70, 99)
    assert Limits.of(100, 30, max_prompt_tokens=50) == Limits(50, 50)
    assert Limits.of(None, 30) == Limits(None, None) and Limits.of(None, 30, 40) == Limits(40, 40)


def test_a_session_drops_from_its_history_and_says_so(tiny_lm):
    model, tok = tiny_lm
    chat = TextChatModel(model, tok, get_template("chatml", tok))
    chat.context_length = 80
    session = ChatSession(chat, system_prompt="Be brief.", settings=GenerationSettings(4, 0.0))
    notes = []
    for i in range(8):
        reply = session.send(f"message number {i} with a few words")
        reply.text()
        notes += reply.notes
        assert reply.prompt_tokens + 4 <= 80
    assert notes and all("oldest messages were left out" in n for n in notes)
    assert session.history[0].role == "user" and session.history[-2].text == "message number 7 with a few words"
    assert [t.role for t in session.history] == ["user", "assistant"] * (len(session.history) // 2)
    before = list(session.history)
    with pytest.raises(InputError, match="too long"):
        session.send("word " * 200)
    assert session.history == before  # a refused message is not kept, and nothing is dropped for it


def test_media_go_with_their_turn(composed, image_file):
    """A composed model's conversation outgrows the context: the exchange with the image is
    dropped whole, so the prompt has no image placeholder left and the router goes back to the
    text route."""
    model = ComposedChatModel(composed, get_template("auto", composed.tokenizer))
    image_turn = Turn("user", "What is this?", images=[str(image_file)])
    first = model.prepare([image_turn])
    n_image = first.images[0].num_tokens
    assert first.route == "vision" and first.ids.count(composed.image_token_id) == n_image
    turns = [image_turn, Turn("assistant", "A square."), Turn("user", "And what is 2 + 2?")]
    model.context_length = len(first.ids) + 4  # the image exchange cannot stay
    reply = ChatSession(model, turns).respond(GenerationSettings(2, 0.0))
    reply.text()
    assert reply.dropped == 2 and reply.route == "base model" and reply.group == "text"
    kept = model.prepare(turns[2:])
    assert reply.prompt_tokens == len(kept.ids) and composed.image_token_id not in kept.ids and not kept.images
    model.context_length = len(model.prepare(turns).ids) + 8  # room for everything: the image stays
    reply = ChatSession(model, turns).respond(GenerationSettings(2, 0.0))
    reply.text()
    assert reply.dropped == 0 and reply.route == "vision" and reply.group == "image"
