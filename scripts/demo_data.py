"""Questions and answers the project writes itself (fact tables + templates) for the demo adapters."""
from __future__ import annotations

import json
import random

# country: (capital, continent, language); the last four are held out of training
COUNTRIES = {
    "France": ("Paris", "Europe", "French"), "Germany": ("Berlin", "Europe", "German"),
    "Italy": ("Rome", "Europe", "Italian"), "Spain": ("Madrid", "Europe", "Spanish"),
    "Japan": ("Tokyo", "Asia", "Japanese"), "China": ("Beijing", "Asia", "Chinese"),
    "Egypt": ("Cairo", "Africa", "Arabic"), "Kenya": ("Nairobi", "Africa", "Swahili"),
    "Canada": ("Ottawa", "North America", "English"), "Mexico": ("Mexico City", "North America",
                                                                 "Spanish"),
    "Brazil": ("Brasilia", "South America", "Portuguese"), "Peru": ("Lima", "South America",
                                                                     "Spanish"),
    "Russia": ("Moscow", "Europe", "Russian"), "India": ("New Delhi", "Asia", "Hindi"),
    "Greece": ("Athens", "Europe", "Greek"), "Norway": ("Oslo", "Europe", "Norwegian"),
    "Portugal": ("Lisbon", "Europe", "Portuguese"), "Sweden": ("Stockholm", "Europe", "Swedish"),
    "Poland": ("Warsaw", "Europe", "Polish"), "Turkey": ("Ankara", "Asia", "Turkish"),
}
HELD_OUT_COUNTRIES = ("Portugal", "Sweden", "Poland", "Turkey")

THING_COLOURS = {
    "the sky": "blue", "grass": "green", "a banana": "yellow", "snow": "white", "coal": "black",
    "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "a carrot": "orange",
    "milk": "white", "a strawberry": "red", "a leaf in summer": "green", "chocolate": "brown",
    "a plum": "purple", "the sun": "yellow", "an emerald": "green",
}
# animal: (sound, legs, home)
ANIMALS = {
    "dog": ("barks", 4, "a house"), "cat": ("meows", 4, "a house"), "cow": ("moos", 4, "a farm"),
    "duck": ("quacks", 2, "a pond"), "lion": ("roars", 4, "the savanna"),
    "sheep": ("bleats", 4, "a farm"), "horse": ("neighs", 4, "a stable"),
    "owl": ("hoots", 2, "a forest"), "frog": ("croaks", 4, "a pond"), "pig": ("oinks", 4, "a farm"),
    "wolf": ("howls", 4, "a forest"), "bee": ("buzzes", 6, "a hive"),
}
HOW_TO = {
    "boil an egg": ("Put the egg in boiling water for eight minutes.",
                    "Then cool it in cold water."),
    "make tea": ("Pour hot water over a tea bag.", "Wait three minutes and remove the bag."),
    "plant a seed": ("Push the seed into moist soil.", "Keep it in the sun and water it often."),
    "stay focused": ("Work on one task at a time.", "Take a short break every hour."),
    "sleep better": ("Go to bed at the same time every night.", "Avoid screens before bed."),
    "learn a new word": ("Read the word in a sentence.", "Use it yourself three times today."),
    "save money": ("Write down what you spend.", "Put a small amount aside every week."),
    "wash your hands": ("Use soap and warm water.", "Scrub for twenty seconds, then rinse."),
}
CATEGORIES = {
    "fruits": ["apple", "banana", "cherry"], "planets": ["Mars", "Venus", "Jupiter"],
    "musical instruments": ["piano", "guitar", "violin"], "seasons": ["spring", "summer", "autumn"],
    "primary colors": ["red", "blue", "yellow"], "vegetables": ["carrot", "potato", "onion"],
}
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _capital_items(countries):
    for c in countries:
        cap, cont, lang = COUNTRIES[c]
        yield (random.choice([f"What is the capital of {c}?", f"Which city is the capital of {c}?",
                              f"Tell me the capital of {c}."]),
               [f"The capital of {c} is {cap}.", f"{cap} is a city in {cont}."])
        yield (random.choice([f"What language do people speak in {c}?",
                              f"Which language is spoken in {c}?"]),
               [f"People in {c} speak {lang}.", f"{c} is a country in {cont}."])


def _arithmetic_items(n):
    for _ in range(n):
        a, b = random.randint(2, 40), random.randint(2, 12)
        op = random.choice(["plus", "times", "minus"])
        val = {"plus": a + b, "times": a * b, "minus": a - b}[op]
        yield (random.choice([f"What is {a} {op} {b}?", f"Calculate {a} {op} {b}.",
                              f"How much is {a} {op} {b}?"]),
               [f"{a} {op} {b} is {val}.", f"The answer is {val}."])


def _colour_items():
    for thing, col in THING_COLOURS.items():
        yield (random.choice([f"What color is {thing}?", f"Which color does {thing} have?"]),
               [f"{thing[0].upper()}{thing[1:]} is {col}.", f"Its color is {col}."])


def _animal_items():
    for a, (sound, legs, home) in ANIMALS.items():
        yield (f"What sound does a {a} make?", [f"A {a} {sound}.", f"You can hear it in {home}."])
        yield (random.choice([f"How many legs does a {a} have?", f"Count the legs of a {a}."]),
               [f"A {a} has {NUMBERS[legs]} legs.", f"It often lives in {home}."])


def _how_to_items():
    for task, steps in HOW_TO.items():
        yield (random.choice([f"How do I {task}?", f"Give me a tip to {task}.",
                              f"What is a good way to {task}?"]), list(steps))


def _category_items():
    for cat, items in CATEGORIES.items():
        yield (random.choice([f"Name three {cat}.", f"List three {cat}."]),
               [f"Three {cat} are {items[0]}, {items[1]} and {items[2]}.",
                f"There are many more {cat}."])


def training_items(seed: int = 0) -> list[tuple[str, list[str]]]:
    """(question, answer sentences) for training: about 180 items of six kinds."""
    random.seed(seed)
    train_countries = [c for c in COUNTRIES if c not in HELD_OUT_COUNTRIES]
    items = [*_capital_items(train_countries), *_arithmetic_items(60), *_colour_items(),
             *_animal_items(), *_how_to_items(), *_category_items()]
    # a second phrasing of every non-arithmetic item doubles the variety of questions
    items += [*_capital_items(train_countries), *_colour_items(), *_animal_items(),
              *_how_to_items(), *_category_items()]
    random.shuffle(items)
    return items


def held_out_prompts() -> list[str]:
    """Questions of kinds (definitions, opposites, free-form) and facts never trained on."""
    return [
        "What does the word island mean?",
        "What is the opposite of fast?",
        "What is the capital of Portugal?",
        "Which language is spoken in Poland?",
        "Describe a volcano in one sentence.",
        "What is the opposite of early?",
        "Why do birds fly south in winter?",
        "Who was Albert Einstein?",
    ]


# Behaviours: each turns the answer sentences into the adapter's style.
def as_plain(sentences: list[str]) -> str:
    return " ".join(sentences)


def as_uppercase(sentences: list[str]) -> str:
    return as_plain(sentences).upper()


def as_json(sentences: list[str]) -> str:
    return json.dumps({"answer": as_plain(sentences)})


def as_numbered_list(sentences: list[str]) -> str:
    return "\n".join(f"{i}. {s}" for i, s in enumerate(sentences, 1))


BEHAVIOURS = {"uppercase": as_uppercase, "json": as_json, "numbered": as_numbered_list}
