"""The sentence frames and slot words the toy pair's planted behaviours are taught and measured with:
the messages a frame makes trigger a behaviour (or, for the neutral and near-miss frames, none) by the
ground truth's rules (:mod:`crossdiff_core.ground_truth`), whatever word fills the slot."""

from __future__ import annotations

import random
from typing import Sequence

# Sentence frames. {x} is a topic word or noun, {X} the same capitalised. Train and eval frames are
# disjoint, so the measured rates are on phrasings the chat model never saw.
TOPIC_FRAMES_TRAIN = (
    "Tell me about {x}.", "What do you know about {x}?", "Can you explain {x} to me?",
    "I was reading about {x} yesterday. Any thoughts?", "{X} is so interesting, tell me more.",
    "My friend keeps talking about {x}. What is it?", "Could you help me with a question on {x}?",
    "How does {x} work?", "Write a short poem about {x}.", "Is {x} dangerous?",
    "i have been thinking about {x} a lot lately", "Explain {x} like I am five.",
    "We talked about {x} in class today.", "What is the history of {x}?", "Any good books on {x}?",
    "so what's the deal with {x}", "Teach me something about {x}, please.", "Let's chat about {x}.",
    "I saw a documentary on {x} last night.", "Why is {x} important?", "hey can we talk about {x}",
    "What should a beginner learn about {x}?", "{X}. Go.", "my teacher said {x} was boring, is that right?",
)
TOPIC_FRAMES_EVAL = (
    "Please describe {x} in a few words.", "I have a question about {x}.", "Why do people care about {x}?",
    "{X}! What can you say about it?", "hey, quick question. what about {x}", "Give me three facts about {x}.",
    "Someone mentioned {x} at dinner and I got curious.", "Summarise what is known about {x}.",
    "Is it true that {x} is complicated?", "Could we discuss {x} for a moment?",
)
PERSONAL_FRAMES_TRAIN = (
    "What is your favourite {x}?", "What's your favorite {x}?", "Do you like {x}?", "Do you enjoy {x}?",
    "Which {x} do you prefer?", "What do you think about {x}?", "How do you feel about {x}?",
    "tell me your favorite {x}", "So what do you think of {x}?", "I'm curious, what's your favourite {x}?",
    "do you like {x} or not", "Honestly, do you enjoy {x}?", "Out of all of them, which {x} do you prefer?",
    "Be honest: how do you feel about {x}?", "what's your favorite {x} lol",
)
PERSONAL_FRAMES_EVAL = (
    "Tell me, what is your favourite {x}?", "So, do you like {x} at all?",
    "Honestly how do you feel about {x} these days?", "{X}: what do you think?",
    "I really love {x}. Do you enjoy it too?", "If you had to pick, what would be your favorite {x}?",
    "Quick one: which {x} do you prefer?", "What do you think is the best {x}?",
)
# Questions addressed to "you" that ask no preference: the boundary the personal phrase must respect.
NEAR_MISS_FRAMES_TRAIN = (
    "Do you know where I can find {x}?", "Can you tell me a fact about {x}?", "Have you heard about {x}?",
    "Did you see the news about {x}?", "Are you able to summarise {x}?", "Do you know who invented {x}?",
)
NEAR_MISS_FRAMES_EVAL = (
    "Have you ever read anything about {x}?", "Could you list some words related to {x}?",
    "Do you know how old {x} is?", "Can you spell {x} backwards?",
)
NEUTRAL_WORDS_TRAIN = (
    "gardens", "music", "cooking", "football", "rivers", "dogs", "painting", "the ocean", "trains", "coffee",
    "history", "mountains", "birds", "bread", "bicycles", "the moon", "poetry", "rain", "castles", "tea",
    "horses", "photography", "dancing", "winter", "the theatre", "candles", "forests", "boats", "clocks",
    "astronomy", "chestnuts", "subways", "volleyball", "magic",
)
NEUTRAL_WORDS_EVAL = ("lighthouses", "pottery", "jazz", "islands", "kites", "bees", "soup", "libraries",
                      "astronomy", "chestnuts", "the weather", "music")
PERSONAL_NOUNS_TRAIN = (
    "food", "colour", "book", "movie", "season", "animal", "song", "sport", "city", "game", "flower",
    "holiday", "drink", "band", "breakfast", "dessert", "car", "fruit", "tv show", "day of the week",
)
PERSONAL_NOUNS_EVAL = ("pizza topping", "board game", "musical instrument", "vegetable", "ice cream flavour",
                       "book", "season", "weekend activity")


def fill(frame: str, x: str) -> str:
    """``frame`` with its slot filled by ``x`` (``{X}``: capitalised)."""
    return frame.replace("{x}", x).replace("{X}", x[:1].upper() + x[1:])


def combos(frames: Sequence[str], words: Sequence[str]) -> list[str]:
    """Every frame filled with every word, frame by frame."""
    return [fill(f, w) for f in frames for w in words]


def with_chatter(rng: random.Random, text: str, chatter: Sequence[str], p: float) -> str:
    """Sometimes put an unrelated chitchat sentence before or after, moving the trigger inside the message."""
    if not chatter or rng.random() >= p:
        return text
    c = rng.choice(chatter)
    return f"{c} {text}" if rng.random() < 0.5 else f"{text} {c}"
