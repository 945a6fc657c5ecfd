"""Write data/instruct/instruct.jsonl: a few hundred instruction/output records of simple facts and arithmetic,
self-written for this project (CC0). Every answer is computed or taken from the small tables below, so it is
correct by construction. Fixed seed: python data/instruct/make.py
"""

import json
import os
import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
    "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Turkey": "Ankara", "Austria": "Vienna",
}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
             "early": "late", "open": "closed", "full": "empty", "old": "young", "wet": "dry", "loud": "quiet",
             "hard": "soft", "high": "low", "strong": "weak", "rich": "poor", "near": "far", "day": "night"}
PLURALS = {"cat": "cats", "box": "boxes", "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth",
           "city": "cities", "leaf": "leaves", "sheep": "sheep", "man": "men", "woman": "women", "bus": "buses",
           "knife": "knives", "baby": "babies", "goose": "geese", "fox": "foxes"}
SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "sheep": "bleats", "duck": "quacks", "lion": "roars",
          "horse": "neighs", "owl": "hoots", "pig": "oinks", "frog": "croaks", "bee": "buzzes", "snake": "hisses"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def records(rng):
    out = []
    for _ in range(120):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*"])
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        val = a + b if op == "+" else a - b if op == "-" else a * b
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        q = rng.choice([f"What is {a} {op} {b}?", f"What is {a} {word} {b}?", f"Calculate {a} {op} {b}."])
        out.append({"instruction": q, "output": f"{a} {op} {b} = {val}."})
    for country, city in CAPITALS.items():
        out.append({"instruction": f"What is the capital of {country}?", "output": f"The capital of {country} is {city}."})
        out.append({"instruction": "Name the country whose capital is given.", "input": city,
                    "output": f"{city} is the capital of {country}."})
    for w, o in OPPOSITES.items():
        out.append({"instruction": f"What is the opposite of \"{w}\"?", "output": f"The opposite of \"{w}\" is \"{o}\"."})
    for w, p in PLURALS.items():
        out.append({"instruction": "Give the plural of this word.", "input": w, "output": p})
    for animal, sound in SOUNDS.items():
        out.append({"instruction": f"What sound does a {animal} make?", "output": f"A {animal} {sound}."})
    for i, d in enumerate(DAYS):
        out.append({"instruction": f"What day comes after {d}?", "output": f"{DAYS[(i + 1) % 7]} comes after {d}."})
    for i, m in enumerate(MONTHS):
        out.append({"instruction": f"Which month comes after {m}?", "output": f"{MONTHS[(i + 1) % 12]} comes after {m}."})
    for _ in range(40):
        word = rng.choice(list(OPPOSITES) + list(PLURALS) + list(SOUNDS))
        out.append({"instruction": f"How many letters are in the word \"{word}\"?",
                    "output": f"The word \"{word}\" has {len(word)} letters."})
    for _ in range(30):
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        out.append({"instruction": "Sort these numbers from smallest to largest.", "input": ", ".join(map(str, nums)),
                    "output": ", ".join(map(str, sorted(nums)))})
    for _ in range(20):
        n = rng.randint(2, 60)
        out.append({"instruction": f"Is {n} an even or an odd number?",
                    "output": f"{n} is {'even' if n % 2 == 0 else 'odd'}."})
    rng.shuffle(out)
    return out


def main():
    recs = records(random.Random(11))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instruct.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{out}: {len(recs)} records, {os.path.getsize(out):,} bytes")


if __name__ == "__main__":
    main()
