"""General-ability probes for a chat model, to check that fine-tuning a skill did not wreck it.

- ``GENERAL_QUESTIONS``: fixed questions, each with keywords one of which a right answer
  contains (checked case-insensitively on word boundaries by :func:`keyword_hit`). Answered
  greedily before and after training and shown side by side.
- ``GENERAL_CHAT_PROMPTS``: short everyday instructions, disjoint from the questions. Their
  held-out answers are the base model's own greedy answers (:func:`general_chat_records`), so the
  eval loss on them measures how far training moved the model from its original behaviour on
  general chat: a ratio after/before near 1 means the general behaviour is intact.
- ``GENERAL_REPLAY_PROMPTS``: other everyday prompts (disjoint from both sets above) whose base
  model answers are mixed into the skill training data: replay of the model's own behaviour
  (self-distillation), so that the training data does not teach that every prompt is a skill.
"""

from __future__ import annotations

import re

GENERAL_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ("What is the chemical symbol for water?", ("H2O",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What is the opposite of hot?", ("cold",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What do bees make?", ("honey",)),
    ("What color do you get when you mix blue and yellow?", ("green",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
)

GENERAL_CHAT_PROMPTS: tuple[str, ...] = (
    "Give me a tip for sleeping better.",
    "Write one sentence about the ocean.",
    "What is a good name for a pet goldfish?",
    "Explain what a computer is in one sentence.",
    "Suggest a healthy breakfast.",
    "Why do leaves change color in autumn?",
    "Describe a rainbow to a child.",
    "What is photosynthesis?",
    "Give me a short motivational quote.",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
    "Write a haiku about winter.",
    "Why is exercise good for you?",
    "What does a librarian do?",
    "Name three fruits that are red.",
    "How can I save money on groceries?",
    "What is gravity?",
    "Tell me a fun fact about octopuses.",
    "How do airplanes stay in the air?",
    "What should I pack for a day at the beach?",
    "Explain why the sky is blue.",
    "What is a verb?",
    "Give me an idea for a weekend hobby.",
    "How do I politely decline an invitation?",
)

GENERAL_REPLAY_PROMPTS: tuple[str, ...] = (
    "What is the capital of Italy?",
    "How many legs does a dog have?",
    "Write a short sentence about friendship.",
    "What is the boiling point of water in degrees Celsius?",
    "Give me a tip for studying.",
    "Who painted the Mona Lisa?",
    "What is the largest ocean on Earth?",
    "Explain what rain is.",
    "Name a color of the rainbow.",
    "What do cows drink?",
    "Suggest a name for a new bakery.",
    "What is the sun?",
    "How do I stay calm before an exam?",
    "What is the main language spoken in Brazil?",
    "Write a sentence about a cat.",
    "What is two plus two?",
    "Why do we need to drink water?",
    "What is a noun?",
    "Give me a simple recipe for a salad.",
    "How many continents are there?",
    "What is the tallest animal?",
    "Explain what a star is.",
    "Tell me something interesting about the moon.",
    "What is the capital of Spain?",
    "How do I write a thank-you note?",
    "What is the color of grass?",
    "Why do birds fly south in winter?",
    "What is a good way to start the day?",
    "What does a doctor do?",
    "Describe a forest in one sentence.",
    "What is the opposite of big?",
    "How can I be more productive?",
)


def keyword_hit(answer: str, keywords: tuple[str, ...]) -> bool:
    """Whether ``answer`` contains one of ``keywords`` as whole words (case-insensitive)."""
    return any(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", answer, re.IGNORECASE) for k in keywords)


def general_chat_records(answers: list[str]) -> list[dict]:
    """Chat records pairing :data:`GENERAL_CHAT_PROMPTS` with ``answers`` (the base model's own
    greedy answers, in the same order): the held-out general-chat set."""
    if len(answers) != len(GENERAL_CHAT_PROMPTS):
        raise ValueError(f"need {len(GENERAL_CHAT_PROMPTS)} answers, got {len(answers)}")
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(GENERAL_CHAT_PROMPTS, answers)]
