"""Write data/recipes/recipes.txt: short home-cooking recipes (title, serves, ingredients, numbered method, tip),
self-written for this project (CC0): a register far from the fables. Composed from self-written dishes, ingredient
lists and method steps with a fixed seed: python data/recipes/make.py
Documents are separated by a line holding only "***" (prepare with --doc-separator '\\n***\\n').
"""

import os
import random

BASES = {
    "soup": ("Soup", ["1 litre vegetable stock", "1 onion, chopped", "2 cloves garlic, crushed", "1 tbsp olive oil"],
             ["Warm the oil in a large pan over a medium heat.", "Add the onion and garlic and cook for 5 minutes "
              "until soft but not brown.", "Add {main} and stir for 2 minutes.", "Pour in the stock, bring to the "
              "boil, then simmer for {mins} minutes.", "Blend until smooth and season with salt and pepper."]),
    "stew": ("Stew", ["500 ml stock", "1 onion, sliced", "2 carrots, diced", "1 tbsp flour", "2 tbsp oil"],
             ["Heat the oil in a heavy casserole.", "Brown {main} in batches and set aside.", "Soften the onion and "
              "carrots in the same pan for 8 minutes.", "Stir in the flour, then the stock, and return {main} to "
              "the pan.", "Cover and cook gently for {mins} minutes, stirring now and then."]),
    "salad": ("Salad", ["2 handfuls mixed leaves", "1 tbsp lemon juice", "3 tbsp olive oil", "1 tsp mustard"],
              ["Whisk the lemon juice, oil and mustard with a pinch of salt.", "Prepare {main} and let it cool.",
               "Toss the leaves with half the dressing.", "Arrange {main} on top and spoon over the rest of the "
               "dressing.", "Serve at once."]),
    "bake": ("Bake", ["200 g flour", "100 g butter, cold and cubed", "1 egg", "2 tbsp milk"],
             ["Heat the oven to {temp} C.", "Rub the butter into the flour until it looks like breadcrumbs.",
              "Beat the egg with the milk and stir it in to make a soft dough.", "Fold in {main}.",
              "Bake for {mins} minutes until golden and firm to the touch."]),
    "pasta": ("Pasta", ["300 g dried pasta", "2 tbsp olive oil", "1 clove garlic, sliced", "40 g grated cheese"],
              ["Cook the pasta in plenty of salted boiling water.", "Meanwhile warm the oil and garlic in a frying "
               "pan.", "Add {main} and cook for {mins} minutes.", "Drain the pasta, keeping a cup of the water, and "
               "toss it in the pan with a splash of the water.", "Finish with the cheese and black pepper."]),
    "curry": ("Curry", ["1 onion, chopped", "1 tbsp curry paste", "400 ml coconut milk", "1 tbsp oil",
                        "rice, to serve"],
              ["Fry the onion in the oil for 6 minutes.", "Stir in the curry paste and cook for 1 minute.",
               "Add {main} and coat well.", "Pour in the coconut milk and simmer for {mins} minutes.",
               "Serve with rice and a squeeze of lime."]),
}
MAINS = [
    ("Carrot and Ginger", "500 g carrots, chopped, and a thumb of ginger, grated"),
    ("Tomato and Basil", "800 g ripe tomatoes, quartered, and a bunch of basil"),
    ("Leek and Potato", "2 leeks, sliced, and 3 potatoes, diced"),
    ("Chicken and Thyme", "4 chicken thighs and 3 sprigs of thyme"),
    ("Beef and Barley", "600 g stewing beef and 100 g pearl barley"),
    ("Chickpea and Spinach", "2 tins of chickpeas, drained, and 200 g spinach"),
    ("Mushroom", "400 g mushrooms, sliced"),
    ("Pumpkin", "1 small pumpkin, peeled and cubed"),
    ("Lentil", "250 g red lentils, rinsed"),
    ("Apple and Cinnamon", "2 apples, diced, and 1 tsp cinnamon"),
    ("Cheese and Chive", "100 g grated cheddar and a handful of chives"),
    ("Salmon and Dill", "2 salmon fillets and a little chopped dill"),
    ("Pea and Mint", "300 g frozen peas and a few mint leaves"),
    ("Cauliflower", "1 cauliflower, broken into florets"),
    ("Sweet Potato", "2 sweet potatoes, cubed"),
    ("Courgette and Lemon", "3 courgettes, sliced, and the zest of a lemon"),
    ("Aubergine", "2 aubergines, cut into chunks"),
    ("Prawn and Chilli", "250 g raw prawns and 1 red chilli, sliced"),
]
TIPS = [
    "Keeps in the fridge for up to three days.", "Freezes well for a month.",
    "Add a pinch of chilli flakes if you like some heat.", "A spoonful of yogurt on top is good.",
    "Use whatever fresh herbs you have.", "Double the quantities for a crowd.",
    "Taste before serving and adjust the salt.", "Warm bread on the side makes it a meal.",
]


def recipe(rng):
    kind = rng.choice(sorted(BASES))
    suffix, ingredients, steps = BASES[kind]
    name, main = rng.choice(MAINS)
    serves, mins, temp = rng.choice([2, 4, 6]), rng.choice([10, 15, 20, 25, 30, 40, 60, 90]), rng.choice([180, 190, 200])
    lines = [f"{name} {suffix}", "", f"Serves {serves}. Ready in about {mins + rng.choice([10, 15, 20])} minutes.",
             "", "Ingredients:"]
    items = ingredients + [main] + rng.sample(["salt and pepper", "a pinch of sugar", "1 bay leaf",
                                               "a knob of butter", "fresh parsley, to serve"], 2)
    lines += [f"- {i}" for i in items]
    lines += ["", "Method:"]
    thing = main.split(",")[0].split(" and ")[0]
    thing = "the " + thing.split(" ", 2)[-1] if thing[0].isdigit() else thing
    for n, step in enumerate(steps, 1):
        lines.append(f"{n}. " + step.format(main=thing, mins=mins, temp=temp))
    lines += ["", "Tip: " + rng.choice(TIPS)]
    return "\n".join(lines)


def main():
    rng = random.Random(7)
    out_list, seen = [], set()
    while sum(len(r) for r in out_list) < 50_000 and len(seen) < 2000:
        r = recipe(rng)
        if r not in seen:
            seen.add(r)
            out_list.append(r)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes.txt")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n***\n".join(out_list) + "\n")
    print(f"{out}: {len(out_list)} recipes, {os.path.getsize(out):,} bytes")


if __name__ == "__main__":
    main()
