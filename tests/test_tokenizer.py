"""data.tokenizer.gpt2() against tiktoken's own gpt2 constructor, offline."""
import hashlib
import random
import shutil

import pytest
import tiktoken

from data.errors import DataError
from data import tokenizer
from data.tokenizer import EOT, EOT_ID, gpt2

# Where tiktoken_ext.openai_public.gpt2() downloads its files from: tiktoken caches a
# download under sha1(url), so a cache holding the package's files answers offline.
URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}

TRICKY = [
    "",
    " ",
    "Hello, world!",
    "Once upon a time, there was a little girl named Lily.",
    "  leading and trailing spaces  ",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF\r\n",
    "trailing newline\n",
    "                 many spaces                    ",
    "\n\n\n\n",
    " \t \n \u00a0 \u3000 mixed whitespace",
    "digits 0 1 12 123 1234 12345 1234567890123456789 3.14159 1,000,000 -42 +7e10",
    "I'm you're he'll we've they'd it's DON'T Can'T O'Neil rock'n'roll",
    "ALL CAPS and MiXeD cAsE and camelCaseWords and snake_case_words",
    "punctuation!!! ??? ... --- ;;; ::: ((())) [[[]]] {{{}}} <<<>>> @#$%^&*",
    "url https://example.com/path?q=1&r=2#frag and email a.b+c@d.org",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "émigré café naïve coöperate façade jalapeño",
    "Ünïcödé Ωμέγα Привет мир שלום עולם مرحبا بالعالم",
    "中文字符测试 日本語のテキスト 한국어 텍스트",
    "emoji 😀🎉👩‍👩‍👧‍👦 🇫🇷 ✨ flags and ZWJ sequences",
    "combining e\u0301 a\u0308 n\u0303 and zero\u200bwidth\u200cjoiners\u200d",
    "math ∑∫∂√∞≈≠≤≥ and arrows ←→↑↓ and ℕℤℚℝ",
    "\x00\x01\x02 control \x7f chars \x1b[31m",
    "a" * 300,
    "ab" * 150 + " " + "xyz " * 50,
    "The end.<|endoftext|>Once upon a time",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|> twice",
    "almost special <|endoftext| and |endoftext|> and <|endoftext >",
    "<|startoftext|> is not special in gpt2",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tiktoken.get_encoding('gpt2'), its downloads answered from a local cache."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for file, path in zip(("vocab.bpe", "encoder.json"), tokenizer.bpe_files()):
        shutil.copy(path, cache / hashlib.sha1(URLS[file].encode()).hexdigest())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        patch.setattr(tiktoken.registry, "ENCODINGS", {})  # build it now, from the cache
        encoding = tiktoken.get_encoding("gpt2")
    return encoding


def random_strings(count, seed):
    """Strings of random code points from several scripts, with spaces and newlines."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F)]
    out = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(1, 80)):
            roll = rng.random()
            if roll < 0.15:
                chars.append(rng.choice([" ", "  ", "\n", "\t", "'s", "123"]))
            else:
                low, high = rng.choice(ranges)
                chars.append(chr(rng.randint(low, high)))
        out.append("".join(chars))
    return out


def test_shape_of_the_encoding():
    enc = gpt2()
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.name == "gpt2"
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode(EOT, allowed_special={EOT}) == [EOT_ID]
    assert gpt2() is enc  # built once


def test_reference_is_tiktokens_own_encoding(reference):
    assert reference is not gpt2()
    assert reference.n_vocab == 50257 and reference.eot_token == 50256


@pytest.mark.parametrize("text", TRICKY)
def test_ids_match_tiktoken(reference, text):
    enc = gpt2()
    assert enc.encode_ordinary(text) == reference.encode_ordinary(text)
    assert enc.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert enc.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_special_tokens_are_handled_like_tiktoken(reference):
    enc = gpt2()
    text = "The end.<|endoftext|>Once upon a time"
    for encoding in (enc, reference):
        with pytest.raises(ValueError):
            encoding.encode(text)  # special tokens are disallowed by default
    assert EOT_ID in enc.encode(text, allowed_special="all")
    assert EOT_ID not in enc.encode_ordinary(text)


def test_random_unicode_matches_tiktoken(reference):
    texts = random_strings(300, seed=4)
    assert gpt2().encode_ordinary_batch(texts) == reference.encode_ordinary_batch(texts)


def test_known_ids():
    # Fixed points of GPT-2 BPE, independent of any tiktoken build.
    assert gpt2().encode("Hello world") == [15496, 995]
    assert gpt2().encode(" the") == [262]


def test_corrupted_files_fail_the_hash_check(tmp_path, monkeypatch):
    vocab, encoder = tokenizer.bpe_files()
    bad_vocab = tmp_path / "vocab.bpe"
    bad_vocab.write_bytes(vocab.read_bytes().replace(b"#version: 0.2", b"#version: 0.3", 1))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tokenizer, "bpe_files", lambda: (bad_vocab, encoder))
    gpt2.cache_clear()
    try:
        with pytest.raises(DataError, match="sha256"):
            gpt2()
    finally:
        gpt2.cache_clear()
