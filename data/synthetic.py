"""Simple English stories from a small grammar: offline data for tests and CPU demos.

Each story follows one plot (a character, a favourite object, a trip to a place, a friend,
a short dialogue, a mishap, help, a happy ending) with random choices at every step, so
the text is varied but has a small vocabulary and strong structure: a tiny model learns
it to well below its unigram entropy within a few hundred CPU steps.

    python -m data.synthetic --text stories.txt --stories 1000   # <|endoftext|>-separated text
    python -m data.synthetic --out data/synthetic                 # generate + prepare
"""
import argparse
import math
import random
import sys
from collections import Counter
from pathlib import Path

from .tokenizer import EOT

GIRLS = ["Lily", "Mia", "Sue", "Anna", "Emma", "Lucy", "Zoe", "Ella"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Tim", "Jack", "Finn"]
PETS = ["Spot", "Coco", "Pip", "Bubbles", "Fluffy", "Rex", "Daisy", "Milo"]
PEOPLE = {"girl": "she", "boy": "he"}
ANIMALS = ["dog", "cat", "bird", "bunny", "bear", "fox", "frog", "duck"]
TRAITS = ["little", "small", "happy", "kind", "curious", "brave", "shy", "funny"]
PLACES = ["the park", "the garden", "the forest", "the beach", "the farm", "the lake",
          "the big hill", "the playground"]
OBJECTS = ["ball", "kite", "toy car", "doll", "hat", "box", "stone", "book", "balloon", "boat"]
COLORS = ["red", "blue", "green", "yellow", "big", "shiny", "soft", "pretty"]
GOOD = ["happy", "glad", "proud", "excited"]
BAD = ["sad", "scared", "worried", "upset"]
WEATHER = ["The sun was warm.", "It was a windy day.", "The sky was blue.",
           "It was a cold morning.", "Birds sang in the trees."]
MISHAPS = ["the {obj} got stuck in a tall tree", "the {obj} fell into the water",
           "a strong wind took the {obj} away", "the {obj} rolled under a big rock",
           "a dog ran off with the {obj}"]
HELP = ["{friend} climbed up and got the {obj}", "{friend} used a long stick to get the {obj}",
        "{friend} ran fast and found the {obj}", "{friend} asked a kind man for help, and he got the {obj}",
        "{friend} pushed very hard and got the {obj} back"]
ENDINGS = ["They played together until the sun went down.", "They went home and ate a big snack.",
           "From that day on, they were best friends.", "They laughed and played all day.",
           "They shared the {obj} and had lots of fun."]
MORALS = ["{name} learned that friends help each other.", "{name} learned that sharing is good.",
          "{name} knew that being kind makes everyone happy.", ""]


class Character:
    """A named girl, boy or animal with the pronouns that go with it."""

    def __init__(self, rng, avoid=()):
        kind = rng.choice(["girl", "boy", "animal"])
        if kind == "animal":
            self.noun, self.subject = rng.choice(ANIMALS), rng.choice(["he", "she"])
            names = PETS
        else:
            self.noun, self.subject = kind, PEOPLE[kind]
            names = GIRLS if kind == "girl" else BOYS
        self.name = rng.choice([n for n in names if n not in avoid])
        self.trait = rng.choice(TRAITS)
        self.possessive = "her" if self.subject == "she" else "his"
        self.object = "her" if self.subject == "she" else "him"

    def intro(self):
        article = "an" if self.trait[0] in "aeiou" else "a"
        return f"{article} {self.trait} {self.noun} named {self.name}"


def story(rng):
    """One story as a string of a few paragraphs."""
    hero = Character(rng)
    friend = Character(rng, avoid={hero.name})
    obj = rng.choice(OBJECTS)
    color = rng.choice(COLORS)
    place = rng.choice(PLACES)
    name, he, his = hero.name, hero.subject.capitalize(), hero.possessive
    opening = rng.choice([
        f"Once upon a time, there was {hero.intro()}. {he} had a {color} {obj}.",
        f"There was {hero.intro()} who had a {color} {obj}.",
        f"Once, {hero.intro()} found a {color} {obj}.",
    ])
    love = rng.choice([f"{he} loved {his} {obj} very much.", f"{name} played with it every day.",
                       f"It was {his} favorite toy."])
    trip = f"One day, {name} went to {place} with {his} {obj}."
    weather = rng.choice(WEATHER) if rng.random() < 0.5 else ""
    meet = f"There, {hero.subject} met {friend.intro()}."
    talk = rng.choice([
        f'"Hi, {friend.name}!" said {name}. "Do you want to play with my {obj}?" '
        f'{friend.name} smiled and said, "Yes, please!"',
        f'"Can I play too?" asked {friend.name}. "Yes, you can," said {name}.',
        f'"What a {color} {obj}!" said {friend.name}. "Let\'s play," said {name}.',
    ])
    play = rng.choice([f"They played with the {obj} together.", "They had so much fun.",
                       f"They took turns with the {obj}."])
    mishap = rng.choice(MISHAPS).format(obj=obj)
    trouble = (f"But then, {mishap}. {name} felt {rng.choice(BAD)}. "
               f'"Oh no, my {obj}!" {hero.subject} cried.')
    helped = rng.choice(HELP).format(friend=friend.name, obj=obj)
    rescue = f'{helped}. "Thank you, {friend.name}!" said {name}.'
    ending = (f"{name} felt {rng.choice(GOOD)} again. "
              + rng.choice(ENDINGS).format(obj=obj) + " "
              + rng.choice(MORALS).format(name=name))
    paragraphs = [" ".join(filter(None, [opening, love])),
                  " ".join(filter(None, [trip, weather, meet, talk, play])),
                  " ".join([trouble, rescue[0].upper() + rescue[1:]]),
                  ending.strip()]
    return "\n".join(paragraphs)


def iter_stories(n, seed=0):
    """Yield `n` stories, deterministically from `seed`."""
    rng = random.Random(seed)
    for _ in range(n):
        yield story(rng)


def generate_stories(n, seed=0):
    """A list of `n` stories, the same for the same seed."""
    return list(iter_stories(n, seed))


def write_text(path, n, seed=0):
    """Write `n` stories to `path`, separated by lines holding only <|endoftext|>; returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(iter_stories(n, seed)):
            f.write(f"{EOT}\n{text}\n" if i else f"{text}\n")
    return path


def unigram_entropy(ids):
    """Entropy in nats of the token frequencies of `ids`: the loss of the best unigram model."""
    counts = Counter(int(i) for i in ids)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def prepare_synthetic(out_dir, n_stories=2000, seed=0, val_fraction=0.05, force=False, quiet=True,
                      tokenizer="gpt2"):
    """Generate `n_stories` stories and prepare them into `out_dir` with `tokenizer` (a
    `data.tokenizer.load_tokenizer` spec or Tokenizer); returns the meta dict.

    Reuses an accepted output made from the same stories (same count and seed) with the same tokenizer.
    """
    from .meta import is_prepared, load_meta, tokenizer_identity
    from .prepare import prepare
    from .sources import describe
    from .tokenizer import load_tokenizer, same_tokenizer

    tokenizer = load_tokenizer(tokenizer)
    text = Path(out_dir) / f"synthetic-{n_stories}-seed{seed}.txt"
    if not force and is_prepared(out_dir):
        meta = load_meta(out_dir)
        if meta["source"] == describe(text) and same_tokenizer(tokenizer_identity(meta), tokenizer.identity()):
            return meta
    write_text(text, n_stories, seed)
    return prepare(text, out_dir, tokenizer=tokenizer, num_proc=1, val_fraction=val_fraction, force=True,
                   quiet=quiet)


def main(argv=None):
    from .errors import DataError

    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--text", help="write the stories to this text file")
    target.add_argument("--out", help="generate and prepare into this directory")
    parser.add_argument("--stories", type=int, default=2000, help="number of stories (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.text:
        write_text(args.text, args.stories, args.seed)
        print(f"wrote {args.stories} stories to {args.text}")
        return 0
    try:
        prepare_synthetic(args.out, args.stories, args.seed, force=True, quiet=False)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
