"""data.synthetic: deterministic, varied, small-vocabulary stories."""
import math
import re

import numpy as np
import pytest

from data.synthetic import generate_stories, iter_stories, unigram_entropy, write_text
from data.tokenizer import EOT, EOT_ID, gpt2


def words(stories):
    return {w.lower() for s in stories for w in re.findall(r"[A-Za-z']+", s)}


def test_same_seed_same_stories_other_seed_others():
    assert generate_stories(50, seed=3) == generate_stories(50, seed=3)
    assert generate_stories(50, seed=3) != generate_stories(50, seed=4)
    assert generate_stories(10, seed=3) == list(iter_stories(10, seed=3))
    assert generate_stories(10, seed=3) == generate_stories(20, seed=3)[:10]


def test_stories_are_varied():
    stories = generate_stories(500, seed=0)
    assert len(set(stories)) == 500
    openings = {s.split(".")[0] for s in stories}
    assert len(openings) > 100
    assert all('"' in s for s in stories)  # every story has dialogue
    assert all(s == s.strip() and EOT not in s for s in stories)


def test_vocabulary_is_small():
    vocab = words(generate_stories(2000, seed=1))
    assert 100 < len(vocab) < 300
    ids = {i for s in generate_stories(2000, seed=1) for i in gpt2().encode_ordinary(s)}
    assert len(ids) < 400


def test_unigram_entropy():
    assert unigram_entropy([7] * 10) == pytest.approx(0.0, abs=1e-12)
    assert unigram_entropy(np.arange(16)) == pytest.approx(math.log(16))
    ids = [i for s in generate_stories(500, seed=2) for i in gpt2().encode_ordinary(s) + [EOT_ID]]
    # Well below a uniform distribution over the tokens used, so there is a lot to learn
    # beyond unigram statistics: the stories repeat a fixed plot.
    assert 3.5 < unigram_entropy(ids) < math.log(len(set(ids))) - 0.5


def test_write_text_separates_stories_with_eot_lines(tmp_path):
    path = write_text(tmp_path / "sub" / "stories.txt", 20, seed=5)
    text = path.read_text(encoding="utf-8")
    assert text.count(f"\n{EOT}\n") == 19
    assert [s.strip() for s in text.split(f"\n{EOT}\n")] == generate_stories(20, seed=5)
