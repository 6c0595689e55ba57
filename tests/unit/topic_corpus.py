"""A small corpus of clearly separate topics, written here so no test needs a download.

Each text is one or two sentences built from a topic's own subjects, verbs and objects, so a
topic is recognisable from almost any of its tokens; the order interleaves topics and the seed
fixes everything.
"""

from __future__ import annotations

import random

TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "subjects": ["The chef", "My grandmother", "The baker", "A cook", "The recipe", "Our kitchen team"],
        "verbs": ["simmered", "baked", "roasted", "chopped", "seasoned", "stirred", "whisked", "fried"],
        "objects": [
            "the garlic and onions",
            "a pot of tomato soup",
            "fresh basil for the pasta",
            "the bread dough in the oven",
            "butter, flour and sugar",
            "the vegetables with olive oil",
            "a spicy curry sauce",
            "chicken with rosemary",
        ],
        "tails": ["before dinner.", "for the family meal.", "until golden.", "with a pinch of salt."],
        "words": [
            " recipe",
            " oven",
            " sauce",
            " dinner",
            " kitchen",
            " bake",
            " cook",
            " chef",
            " soup",
            " flour",
        ],
    },
    "football": {
        "subjects": [
            "The striker",
            "The goalkeeper",
            "The referee",
            "The coach",
            "The home team",
            "The midfielder",
        ],
        "verbs": ["scored", "saved", "passed", "defended", "kicked", "tackled", "headed", "celebrated"],
        "objects": [
            "a penalty in the final minute",
            "the ball into the net",
            "a corner kick",
            "the match against the champions",
            "two goals in the second half",
            "a free kick outside the box",
            "the league title",
            "the cup final",
        ],
        "tails": ["as the fans cheered.", "in the stadium.", "before half time.", "during extra time."],
        "words": [
            " goal",
            " match",
            " team",
            " league",
            " striker",
            " stadium",
            " fans",
            " coach",
            " penalty",
            " ball",
        ],
    },
    "astronomy": {
        "subjects": [
            "The telescope",
            "The astronomer",
            "A distant galaxy",
            "The space probe",
            "The observatory",
        ],
        "verbs": ["observed", "detected", "orbited", "photographed", "measured", "mapped", "discovered"],
        "objects": [
            "a supernova in a spiral galaxy",
            "the rings of Saturn",
            "a comet near the sun",
            "the moons of Jupiter",
            "light from a neutron star",
            "a black hole at the galactic centre",
            "planets around another star",
            "the craters of the moon",
        ],
        "tails": [
            "through the night sky.",
            "billions of light years away.",
            "in deep space.",
            "with infrared light.",
        ],
        "words": [
            " star",
            " planet",
            " galaxy",
            " orbit",
            " moon",
            " telescope",
            " sun",
            " space",
            " comet",
            " universe",
        ],
    },
    "finance": {
        "subjects": ["The central bank", "Investors", "The stock market", "The finance minister", "Traders"],
        "verbs": ["raised", "cut", "bought", "sold", "borrowed", "invested", "hedged", "priced"],
        "objects": [
            "interest rates to fight inflation",
            "government bonds as yields fell",
            "shares of the largest banks",
            "the dollar against the euro",
            "a loan at a fixed rate",
            "equities after strong earnings",
            "the budget deficit",
            "credit to small businesses",
        ],
        "tails": [
            "on Wall Street.",
            "during the trading session.",
            "as markets closed.",
            "despite the recession.",
        ],
        "words": [
            " bank",
            " market",
            " stock",
            " interest",
            " inflation",
            " investors",
            " rates",
            " bonds",
            " price",
            " money",
        ],
    },
}


def topic_corpus(per_topic: int = 100, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(texts, topic_of_each_text)``, topics interleaved."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(per_topic):
        for name, parts in TOPICS.items():
            sentence = " ".join(
                [rng.choice(parts["subjects"]), rng.choice(parts["verbs"]), rng.choice(parts["objects"])]
            )
            text = f"{sentence} {rng.choice(parts['tails'])}"
            if i % 2:
                other = rng.choice(parts["subjects"]).lower()
                text += f" Later {other} {rng.choice(parts['verbs'])} {rng.choice(parts['objects'])}."
            texts.append(text)
            labels.append(name)
    return texts, labels
