"""General-ability probes: what a language model knew before the task sequence, measured after
every task and never trained on (the retention of general ability, issue 14 item 5).

A probe (``continual.probes``) is scored like a task but is not one: its values form a second
matrix P (the row before training, then one row per trained task), beside R. Two built-in sets,
written for this package (general knowledge and everyday instructions, no overlap with the
built-in tasks):

- ``general:chat``, metric ``loss``: the mean next-token loss (nats per token) of the reference
  answers, teacher forced: how far fine-tuning moved the model's general chat distribution
  (lower is better; the report gives the relative change since before training);
- ``general:questions``, metric ``contains``: greedy answers to short factual questions, a hit when
  the answer contains the key word (a chat model answers in a sentence, so exact match would
  measure the format, not the knowledge).

A probe can also be a JSON / JSONL file of alpaca records (``loss`` or ``exact_match``; for
``contains`` each record gives the key word in a ``key`` field).
"""

from __future__ import annotations

#: (question, reference answer, key word): general knowledge a small chat model answers.
GENERAL = [
    ("What is the capital of France?", "The capital of France is Paris.", "Paris"),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue.", "blue"),
    ("How many days are there in a week?", "There are seven days in a week.", "seven|7"),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.",
     "Jupiter"),
    ("What do bees make?", "Bees make honey.", "honey"),
    ("What is the boiling point of water at sea level in Celsius?",
     "Water boils at 100 degrees Celsius at sea level.", "100"),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle.", "lion"),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "cold"),
    ("How many legs does a spider have?", "A spider has eight legs.", "eight|8"),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air.", "carbon dioxide|CO2"),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.", "Shakespeare"),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius.", "0|zero"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Tokyo"),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean.", "Pacific"),
    ("How many continents are there?", "There are seven continents.", "seven|7"),
    ("What is the main language spoken in Brazil?", "The main language spoken in Brazil is Portuguese.",
     "Portuguese"),
    ("Give me a tip for sleeping better.",
     "Go to bed at the same time every night and avoid screens for an hour before sleep.", "bed|sleep"),
    ("Suggest a name for a pet goldfish.", "How about Bubbles? It is a cheerful name for a goldfish.", "Bubbles"),
    ("Write a short greeting for a birthday card.", "Happy birthday! Wishing you a wonderful year ahead.",
     "birthday"),
    ("What should I pack for a day at the beach?",
     "Pack sunscreen, a towel, water, a hat and a snack.", "sunscreen|towel"),
    ("Explain what a noun is in one sentence.", "A noun is a word that names a person, place, thing or idea.",
     "person|thing|name"),
    ("How can I stay focused while studying?",
     "Work in short blocks with breaks, put your phone away and study in a quiet place.", "break|phone|quiet"),
    ("What is a healthy breakfast?", "Oatmeal with fruit and a glass of milk is a healthy breakfast.",
     "fruit|oat|egg"),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'.", "gracias"),
]

PROBE_SETS = ("general:chat", "general:questions")


def general_records() -> list[dict]:
    """The built-in general set as alpaca records with their key word."""
    return [{"instruction": q, "input": "", "output": a, "key": k} for q, a, k in GENERAL]


def key_hit(answer: str, key: str) -> bool:
    """Whether ``answer`` contains one of the ``|``-separated alternatives of ``key`` (case-insensitive)."""
    low = answer.lower()
    return any(k.strip().lower() in low for k in key.split("|") if k.strip())
