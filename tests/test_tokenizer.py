"""data.tokenizer: gpt2() against tiktoken's own gpt2 constructor, offline; load_tokenizer for
GPT-2 and Hugging Face tokenizers, their identity, and save() read back by us and by transformers."""
import hashlib
import json
import pickle
import random
import shutil

import pytest
import tiktoken

from data.errors import DataError
from data import tokenizer
from data.hf_tokenizer import HFTokenizer
from data.synthetic import generate_stories
from data.tokenizer import EOT, EOT_ID, GPT2_SHA256, dtype_for, gpt2, gpt2_tokenizer, load_tokenizer
from small_tokenizers import SHIFT, train_bpe, widen

STORIES = generate_stories(6, seed=21) + ["Hi <eos> there <bos> and <|endoftext|> too.", "  two  spaces\n\nend "]

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


# ----- the Tokenizer abstraction --------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 300-merge BPE tokenizer with <bos> and <eos> named in its tokenizer_config.json."""
    return train_bpe(tmp_path_factory.mktemp("tok") / "tiny-bpe",
                     config={"bos_token": "<bos>", "eos_token": {"content": "<eos>", "special": True}})


@pytest.fixture(scope="module")
def wide(trained, tmp_path_factory):
    """The trained tokenizer with every id moved above 65535."""
    return widen(trained, tmp_path_factory.mktemp("tok") / "wide-bpe")


def auto_tokenizer(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def test_gpt2_tokenizer_keeps_the_gpt2_ids_and_rule():
    tok = load_tokenizer("gpt2")
    assert tok is gpt2_tokenizer() and tok.encoding is gpt2()
    vocab_bpe, encoder_json = tokenizer.bpe_files()
    assert GPT2_SHA256 == hashlib.sha256(vocab_bpe.read_bytes() + encoder_json.read_bytes()).hexdigest()
    assert tok.identity() == {"name": "gpt2", "sha256": GPT2_SHA256, "vocab_size": 50257, "bos_id": None,
                              "eos_id": 50256}
    assert json.loads(json.dumps(tok.identity())) == tok.identity()
    assert tok.dtype == "uint16" and tok.is_gpt2() and tok.directory_suffix() == ""
    assert tok.encode_batch(STORIES) == gpt2().encode_ordinary_batch(STORIES)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.document([15496, 995]) == [15496, 995, EOT_ID]  # no bos: the ids, then <|endoftext|>
    assert tok.decode(tok.encode(STORIES[0])) == STORIES[0]
    assert pickle.loads(pickle.dumps(tok)) is tok


def test_dtype_follows_the_vocabulary_size():
    assert [dtype_for(n) for n in (256, 50257, 65535, 65536, 262144)] == ["uint16"] * 3 + ["uint32"] * 2


def test_gpt2_save_loads_back_as_gpt2_here_and_in_transformers(tmp_path):
    gpt2_tokenizer().save(tmp_path / "gpt2")
    vocab_bpe, encoder_json = tokenizer.bpe_files()
    assert (tmp_path / "gpt2" / "vocab.json").read_bytes() == encoder_json.read_bytes()
    assert (tmp_path / "gpt2" / "merges.txt").read_bytes() == vocab_bpe.read_bytes()
    assert load_tokenizer(tmp_path / "gpt2") is gpt2_tokenizer()
    auto = auto_tokenizer(tmp_path / "gpt2")
    assert type(auto).__name__ == "GPT2Tokenizer"
    assert (auto.bos_token_id, auto.eos_token_id) == (EOT_ID, EOT_ID)
    for text in STORIES:
        assert auto.encode(text, add_special_tokens=False) == gpt2_tokenizer().encode(text), text
    # The same vocabulary written otherwise (as transformers writes it) is still GPT-2's.
    vocab = json.loads(encoder_json.read_text())
    (tmp_path / "gpt2" / "vocab.json").write_text(json.dumps(vocab, indent=1))
    assert load_tokenizer(tmp_path / "gpt2") is gpt2_tokenizer()
    lines = vocab_bpe.read_text().splitlines()
    (tmp_path / "gpt2" / "merges.txt").write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # one merge fewer
    with pytest.raises(DataError, match="--tokenizer .* not GPT-2's"):
        load_tokenizer(tmp_path / "gpt2")


def test_a_hugging_face_tokenizer_from_its_directory_or_file(trained):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(trained / "tokenizer.json"))
    for spec in (trained, trained / "tokenizer.json", str(trained)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.identity() == {"name": "tiny-bpe",
                                  "sha256": hashlib.sha256((trained / "tokenizer.json").read_bytes()).hexdigest(),
                                  "vocab_size": 558, "bos_id": backend.token_to_id("<bos>"),
                                  "eos_id": backend.token_to_id("<eos>")}
    assert (tok.bos_id, tok.eos_id) == (0, 1) and tok.dtype == "uint16"
    assert tok.directory_suffix() == f"-tiny-bpe-{tok.sha256[:8]}" and not tok.is_gpt2()
    assert tok.encode_batch(STORIES[:6]) == [e.ids for e in backend.encode_batch(STORIES[:6])]
    ids = tok.encode(STORIES[-2])  # the text of special tokens stays text
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.decode(ids) == STORIES[-2]
    assert tok.document([7, 8]) == [0, 7, 8, 1]  # <bos> story <eos>
    assert tok.decode(tok.document(tok.encode("The end."))) == "<bos>The end.<eos>"
    again = pickle.loads(pickle.dumps(tok))
    assert again.identity() == tok.identity() and again.encode_batch(STORIES) == tok.encode_batch(STORIES)


@pytest.mark.parametrize("which", ["trained", "wide"])
def test_save_loads_back_here_and_in_transformers_with_the_same_ids(which, request, tmp_path):
    tok = load_tokenizer(request.getfixturevalue(which))
    tok.save(tmp_path / "saved")
    back = load_tokenizer(tmp_path / "saved")
    assert back.identity() == tok.identity()
    auto = auto_tokenizer(tmp_path / "saved")
    assert (auto.bos_token_id, auto.eos_token_id) == (tok.bos_id, tok.eos_id)
    for text in STORIES:
        ids = tok.encode(text)
        assert auto.encode(text, add_special_tokens=False) == back.encode(text) == ids, text
        assert auto.decode(ids) == tok.decode(ids)


def test_the_wide_tokenizer_has_uint32_ids(trained, wide):
    small, big = load_tokenizer(trained), load_tokenizer(wide)
    assert big.vocab_size == small.vocab_size + SHIFT and big.dtype == "uint32"
    assert (big.bos_id, big.eos_id) == (small.bos_id + SHIFT, small.eos_id + SHIFT)
    for text in STORIES:
        assert big.encode(text) == [i + SHIFT for i in small.encode(text)]


def test_where_bos_and_eos_come_from(tmp_path):
    bare = load_tokenizer(train_bpe(tmp_path / "bare", merges=20))  # no config: the usual names
    assert (bare.bos_id, bare.eos_id) == (0, 1)
    other = train_bpe(tmp_path / "map", merges=20, specials=("<s>", "</s>", "<sep>", "<end>"))
    (other / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<end>", "bos_token": "<sep>"}))
    assert (load_tokenizer(other).bos_id, load_tokenizer(other).eos_id) == (2, 3)
    (other / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    assert (load_tokenizer(other).bos_id, load_tokenizer(other).eos_id) == (None, 1)  # the config first
    assert load_tokenizer(other).document([5]) == [5, 1]
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(DataError, match="eos_token '<nope>' is not in tokenizer.json"):
        load_tokenizer(other)


def test_a_tokenizer_without_an_end_of_document_token_is_refused(tmp_path):
    none = train_bpe(tmp_path / "none", merges=20, specials=("<pad>",))
    with pytest.raises(DataError, match="has no end-of-document token; name it in a tokenizer_config.json") as error:
        load_tokenizer(none)
    assert "\n" not in str(error.value)
    (none / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    assert load_tokenizer(none).eos_id == 0


def test_bad_tokenizer_specs_name_the_flag(tmp_path):
    with pytest.raises(DataError, match="--tokenizer 'nowhere' is neither 'gpt2'"):
        load_tokenizer("nowhere")
    with pytest.raises(DataError, match="--tokenizer .* holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="--tokenizer .*broken.json is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
