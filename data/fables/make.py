"""Write data/fables/fables.txt: short moral fables in plain prose, self-written for this project (CC0).

A handful are written out in full below; the rest are composed from self-written plot outlines, characters and
morals with a fixed seed, so the file is reproducible: python data/fables/make.py
Documents are separated by a line holding only "***" (prepare with --doc-separator '\\n***\\n').
"""

import os
import random

HANDWRITTEN = [
    """The Heron and the Puddle

A heron stood all morning beside a puddle left by the rain, waiting for a fish. A sparrow watched him and laughed.
"There are no fish in a puddle," she said. "Go down to the river, where the water is deep." But the heron was proud
and would not be told. "I have always found fish where I look for them," he said, and he went on standing. By
evening the sun had dried the puddle to mud, and the heron flew home hungry.

Patience is a virtue only when you wait in the right place.""",
    """The Oak and the Reeds

A great oak grew at the edge of a marsh, and it often mocked the reeds for bending whenever the wind blew. "Look at
me," it said. "I bow to no one." One autumn night a storm came down from the hills. The reeds bent low and let the
wind pass over them. The oak stood straight and fought the wind until, with a crack like thunder, it fell across the
marsh. In the morning the reeds stood up again around its broken trunk.

It is better to bend than to break.""",
    """The Ant and the Lost Seed

An ant found a seed far too heavy for her to carry. She pushed it and pulled it, but it would not move. A beetle
passing by said, "Leave it. You will never get it home." The ant did not answer. She went back to the nest and
returned with nine of her sisters, and together they carried the seed home before the sun went down.

What one cannot do alone, many can do together.""",
    """The Goat Who Counted Stars

A young goat lay awake every night trying to count the stars. Each night he lost his place and began again, and
each morning he was too tired to climb with the herd. At last an old goat said to him, "The stars will still be
there tomorrow, and the mountain will not wait for you." The young goat slept that night, and in the morning he
climbed higher than he ever had before.

Do not spend today's strength on a task that has no end.""",
    """The Crow and the Shiny Spoon

A crow found a silver spoon in a garden and was so pleased with it that she carried it everywhere. She could not
eat, because her beak was full, and she could not sing, because she would drop it. When winter came she was thin
and silent, and the spoon was as bright as ever.

Treasure that you cannot put down owns you.""",
    """The Tortoise Who Was Asked to Hurry

The animals of the valley were building a dam before the spring floods, and the tortoise was slow at carrying
stones. The hare told him to hurry, and the fox told him to hurry, and the deer told him to hurry. The tortoise said
nothing and kept carrying. When the others grew tired and lay down in the sun, the tortoise kept carrying, and when
the flood came, the last stone on the dam was his.

Steady work outlasts quick promises.""",
]

ANIMALS = [
    ("fox", "clever"), ("hare", "quick"), ("tortoise", "patient"), ("lion", "proud"), ("mouse", "small"),
    ("crow", "vain"), ("wolf", "hungry"), ("lamb", "gentle"), ("ant", "busy"), ("grasshopper", "idle"),
    ("owl", "wise"), ("goat", "stubborn"), ("donkey", "foolish"), ("bear", "greedy"), ("badger", "honest"),
    ("squirrel", "careful"), ("frog", "boastful"), ("stork", "polite"), ("dog", "faithful"), ("cat", "sly"),
    ("rooster", "loud"), ("heron", "proud"), ("beaver", "hard-working"), ("magpie", "curious"),
    ("peacock", "vain"), ("mole", "shy"), ("deer", "timid"), ("eagle", "mighty"), ("snail", "slow"),
    ("bee", "diligent"),
]
PLACES = [
    "at the edge of a dark forest", "beside a slow brown river", "on a hill above the village",
    "in a meadow full of clover", "near an old stone well", "under the roots of a great oak",
    "by a pond where the rushes grew thick", "in a farmyard behind the mill", "high on a rocky mountain",
    "in a valley where the wind was always cold", "at the bottom of a quiet orchard", "near a road that led to town",
]
SEASONS = ["one spring morning", "in the heat of summer", "as the autumn leaves were falling",
           "on the first cold day of winter", "after a long week of rain", "one bright evening",
           "when the harvest was nearly in", "on a night with a full moon"]
TREASURES = ["a basket of ripe figs", "a round yellow cheese", "a pile of golden grain", "a sweet honeycomb",
             "a bright silver bell", "a field of fresh carrots", "a warm dry burrow", "a bag of chestnuts"]

PLOTS = {
    "pride": (
        "{A_} lived {place}. {He} was so {atrait} that {he} thought no one could equal {him}. "
        "{season_cap}, {B_} came by and asked for help finding {treasure}. "
        "\"Why should I help one as plain as you?\" said the {a}. \"I have better things to do.\" "
        "The {b} went on alone, and found {treasure} before nightfall. "
        "The next day a storm blew down the {a}'s home, and it was the {b}, remembering nothing of the insult, "
        "who gave {him} shelter. The {a} hung {his} head and said nothing for a long time.",
        ["Pride goes before a fall.", "The humble often shelter the proud.",
         "Scorn no one, for you may need them tomorrow."],
    ),
    "kindness": (
        "{season_cap}, {A_} found {B_} caught in a hunter's net {place}. "
        "\"Help me,\" cried the {b}, \"and one day I will help you.\" The {a} laughed, for the {b} looked helpless, "
        "but {he} chewed through the cords all the same and set the {b} free. "
        "Not long after, the {a} fell into a deep pit and could not climb out. "
        "The {b} heard {his} calls and brought a long vine, and with it the {a} climbed back into the light.",
        ["No act of kindness, however small, is ever wasted.", "Little friends may prove great friends.",
         "Kindness given is kindness returned."],
    ),
    "greed": (
        "{A_} lived {place} and had {treasure} of {his} own. "
        "{season_cap}, {he} saw {his} reflection in the water and thought it was another {a} with "
        "{treasure} twice as large. Wanting both, {he} snapped at the reflection, and {his} own share fell into "
        "the water and was lost. {B_}, who had watched from the bank, said only, "
        "\"You had enough, and now you have nothing.\"",
        ["Greed loses what it has by grasping at what it has not.", "Be content with what you have.",
         "Those who want everything often end with nothing."],
    ),
    "patience": (
        "{A_} and {B_} both lived {place}. {season_cap}, they each planted a seed. "
        "The {a} dug up {his} seed every morning to see whether it had grown, and every morning it had not. "
        "The {b} watered {hisb} seed and left it alone. By the end of the year the {b} sat in the shade of a young "
        "tree heavy with fruit, while the {a} still had only a seed in {his} paw.",
        ["Good things come to those who wait.", "Patience grows what hurry destroys.",
         "Leave a seed alone and let it become a tree."],
    ),
    "honesty": (
        "{A_} was carrying {treasure} home {place} when {he} dropped it into a stream. "
        "A kind spirit of the stream rose up and offered {him} a treasure made of gold. "
        "\"That is not mine,\" said the {a}. The spirit offered one of silver. \"That is not mine either,\" said "
        "the {a}. At last the spirit held up {treasure}, and the {a} said, \"That is mine.\" "
        "For {his} honesty the spirit gave {him} all three. When {B_} heard of it, {heb} threw {hisb} own bundle into "
        "the stream and claimed the golden one, and the spirit sank beneath the water and gave {himb} nothing at all.",
        ["Honesty is the best policy.", "Truth is rewarded; a lie loses even what it had.",
         "Say what is yours, and no more."],
    ),
    "cleverness": (
        "{season_cap}, {A_} was very thirsty and came upon a tall jar {place}. "
        "There was water at the bottom, but {his} mouth could not reach it. "
        "{B_} told {him} to give up and go home. Instead the {a} gathered small pebbles and dropped them into the jar "
        "one by one, until the water rose to the top, and {he} drank until {he} was satisfied.",
        ["Necessity is the mother of invention.", "Little by little does the trick.",
         "Where strength fails, thought may succeed."],
    ),
    "preparation": (
        "All summer {A_} worked {place}, storing food for the winter. {B_} spent those same days singing and "
        "sleeping in the sun. \"Why work so hard?\" asked the {b}. \"There is plenty to eat.\" "
        "When the snow came, the {a} had a full store, and the {b} had nothing. The {b} came knocking, cold and "
        "hungry, and the {a} shared a little, saying, \"Next summer, remember this winter.\"",
        ["Prepare today for the needs of tomorrow.", "Work while the sun shines.",
         "The idle summer makes the hungry winter."],
    ),
    "teamwork": (
        "{A_} and {B_} lived {place} and were always quarrelling. {season_cap}, a hungry wolf came and tried to "
        "catch them one at a time. Alone, each of them was nearly caught. At last they stood back to back, the {a} "
        "watching one way and the {b} the other, and whenever the wolf came near, one of them saw him first. "
        "In the end the wolf gave up and went away, and the two never quarrelled again.",
        ["United we stand, divided we fall.", "Two who watch together are safer than one who watches alone.",
         "Friends who stand together cannot be taken one by one."],
    ),
    "boasting": (
        "{A_} lived {place} and boasted to everyone that {he} could run faster than the wind. "
        "{B_}, who was {btrait}, challenged {him} to a race to the old stone at the end of the valley. "
        "The {a} ran ahead, and when {he} saw how far behind the {b} was, {he} lay down to rest and fell asleep. "
        "The {b} never stopped, step by step, and passed the sleeping {a}. When the {a} woke, the {b} was already "
        "sitting on the stone, waiting.",
        ["Slow and steady wins the race.", "Boasting wins no races.",
         "Do not stop before the finish just because you are ahead."],
    ),
    "flattery": (
        "{A_} sat in a tree {place} holding {treasure}. {B_} came by and wanted it. "
        "\"What a fine creature you are,\" said the {b}. \"Surely your voice is as lovely as your feathers. "
        "Will you not sing for me?\" The {a}, pleased, opened {his} mouth to sing, and {treasure} fell to the "
        "ground. The {b} took it and walked away, calling back, \"Next time, think before you sing.\"",
        ["Do not trust flatterers.", "Sweet words can hide a hungry heart.",
         "Those who praise you may want something from you."],
    ),
}

PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def story(rng):
    kind = rng.choice(sorted(PLOTS))
    text, morals = PLOTS[kind]
    (a, atrait), (b, btrait) = rng.sample(ANIMALS, 2)
    pa, pb = PRONOUNS[rng.choice(["he", "she"])], PRONOUNS[rng.choice(["he", "she"])]
    season = rng.choice(SEASONS)
    fields = dict(
        a=a, b=b, atrait=atrait, btrait=btrait, place=rng.choice(PLACES), treasure=rng.choice(TREASURES),
        season_cap=season[0].upper() + season[1:],
        A_=f"{article(atrait)} {a}", B_=f"{article(btrait)} {b}",
        he=pa[0], He=pa[0].capitalize(), him=pa[1], his=pa[2], heb=pb[0], himb=pb[1], hisb=pb[2],
    )
    body = text.format(**fields)
    # sentences that begin with the second character's name need a capital letter
    body = ". ".join(s[0].upper() + s[1:] if s else s for s in body.split(". "))
    body = body[0].upper() + body[1:]
    title = f"The {a.capitalize()} and the {b.capitalize()}"
    return f"{title}\n\n{body}\n\n{rng.choice(morals)}"


def main():
    rng = random.Random(20240501)
    stories = list(HANDWRITTEN)
    seen = set()
    while sum(len(s) for s in stories) < 90_000:
        s = story(rng)
        if s not in seen:
            seen.add(s)
            stories.append(s)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fables.txt")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n***\n".join(stories) + "\n")
    print(f"{out}: {len(stories)} fables, {os.path.getsize(out):,} bytes")


if __name__ == "__main__":
    main()
