"""Small Hugging Face tokenizers for the data tests, trained offline on generated stories."""
import json
from pathlib import Path

from data.synthetic import generate_stories

SPECIALS = ("<bos>", "<eos>")
SHIFT = 65536  # widen() moves every id above uint16's range by this much


def train_bpe(directory, merges=300, specials=SPECIALS, config=None, stories=300, seed=0):
    """A byte-level BPE tokenizer with about `merges` merges in `directory`/tokenizer.json, plus
    `config` (a dict) as its tokenizer_config.json when given; returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(specials) + merges, special_tokens=list(specials),
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(generate_stories(stories, seed), trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def widen(source, directory):
    """`source`'s tokenizer with SHIFT unused tokens in front of its vocabulary: the same
    tokenization, every id (special tokens included) raised by SHIFT, above 65535."""
    spec = json.loads((Path(source) / "tokenizer.json").read_text())
    vocab = {f"<unused{i}>": i for i in range(SHIFT)}
    vocab.update({token: i + SHIFT for token, i in spec["model"]["vocab"].items()})
    spec["model"]["vocab"] = vocab
    for token in spec["added_tokens"]:
        token["id"] += SHIFT
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (Path(source) / name).is_file():
            (directory / name).write_bytes((Path(source) / name).read_bytes())
    return directory
