"""The Hugging Face round trip: a random Gemma3ForCausalLM and a BPE tokenizer saved with save_pretrained,
fine-tuned by `train.py --init-from` on text it prepares with that tokenizer, exported by models.export,
and loaded back by transformers: the same logits, token ids and greedy text as ours."""
import json
import os

import numpy as np
import pytest

import train
from data.meta import load_meta
from data.synthetic import generate_stories
from data.tokenizer import load_tokenizer
from models import Gemma3, Gemma3Config, export, generate
from models.hf_load import hf_state_dict
from nn.checkpoint import load_weights
from small_tokenizers import train_bpe

WINDOW, SEQ = 6, 32  # the sliding window is shorter than the sequences trained on


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hugging Face directory: a random tied Gemma 3 with 2 KV heads (its vocabulary the tokenizer's,
    not a multiple of 128) and its tokenizer, both written by save_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    bpe = train_bpe(root / "bpe", merges=200)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe / "tokenizer.json"), bos_token="<bos>",
                                                eos_token="<eos>")
    vocab = len(fast)
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=16,
        max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=None,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).float()
    with torch.no_grad():  # norm weights start at zero: randomise everything so that each one matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    directory = root / "gemma"
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory), vocab


@pytest.fixture(scope="module")
def fine_tuned(checkpoint, tmp_path_factory):
    """A run fine-tuned from the checkpoint for 3 updates, on a raw text file train.py prepares."""
    directory, _ = checkpoint
    root = tmp_path_factory.mktemp("run")
    text = root / "stories.jsonl"
    text.write_text("".join(json.dumps({"text": story}) + "\n" for story in generate_stories(300, seed=3)))
    out = root / "run"
    argv = ["--init-from", directory, "--device", "cpu", "--data", str(text), "--out", str(out), "--batch-size", "4",
            "--block-size", str(SEQ), "--grad-accum", "1", "--max-updates", "3", "--warmup", "1", "--lr", "1e-3",
            "--eval-every", "3", "--eval-batches", "1", "--no-progress"]
    assert train.main(argv) == 0
    return str(out)


def run_config(run):
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


def ours(run):
    model = Gemma3(Gemma3Config.from_dict(run_config(run)["model"]))
    model.load_state_dict(load_weights(os.path.join(run, "best.safetensors")))
    return model


def test_init_from_takes_the_checkpoints_config_weights_and_tokenizer(checkpoint, tmp_path):
    directory, vocab = checkpoint
    args = train.parse_args(["--init-from", directory, "--device", "cpu", "--data", "synthetic", "--out",
                             str(tmp_path / "run"), "--block-size", str(SEQ), "--no-progress"])
    assert (args.lr, args.min_lr, args.warmup, args.max_updates) == (5e-5, 5e-6, 20, 500)  # fine-tuning defaults
    trainer = train.setup(args)
    config = trainer.model.config
    assert (config.vocab_size, config.unpadded_vocab_size) == (128 * -(-vocab // 128), vocab)  # padded
    assert config.tie_word_embeddings and config.num_key_value_heads == 2 and config.sliding_window == WINDOW
    weights, loaded = hf_state_dict(directory), trainer.model.state_dict()
    assert set(loaded) == set(weights) - {"lm_head.weight"}
    for name, array in weights.items():
        if name != "lm_head.weight":
            np.testing.assert_array_equal(loaded[name][:len(array)], array, err_msg=name)
    assert not loaded["model.embed_tokens.weight"][vocab:].any()  # the padding rows
    # The data were prepared with the checkpoint's tokenizer, into a directory of their own.
    meta = load_meta(run_config(tmp_path / "run")["data"])
    assert meta["tokenizer"] == load_tokenizer(directory).identity() and meta["dtype"] == "uint16"


def test_the_fine_tuned_run_records_its_tokenizer_and_changed_the_weights(checkpoint, fine_tuned):
    directory, vocab = checkpoint
    tokenizer = load_tokenizer(directory)
    assert run_config(fine_tuned)["tokenizer"] == tokenizer.identity()
    assert load_tokenizer(os.path.join(fine_tuned, "tokenizer")).identity() == tokenizer.identity()
    before = hf_state_dict(directory)["model.embed_tokens.weight"]
    after = load_weights(os.path.join(fine_tuned, "best.safetensors"))["model.embed_tokens.weight"][:vocab]
    assert 0 < np.abs(after - before).max() < 0.1  # three small updates of the pretrained weights


def test_the_export_loads_in_transformers_with_our_logits_ids_and_greedy_text(checkpoint, fine_tuned, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory, vocab = checkpoint
    out = str(tmp_path / "exported")
    assert export.main(["--run", fine_tuned, "--out", out]) == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    assert hf.config.vocab_size == vocab and hf.config.tie_word_embeddings  # cut back to the real vocabulary
    model = ours(fine_tuned)
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, SEQ))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    mine = model(ids)[0].numpy()[..., :vocab]
    assert np.abs(theirs - mine).max() <= 1e-5 * max(1.0, np.abs(mine).max())

    tokenizer = load_tokenizer(directory)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    stories = generate_stories(4, seed=9)
    for story in stories:
        assert hf_tokenizer(story, add_special_tokens=False)["input_ids"] == tokenizer.encode(story)
    continuations = []
    for story in stories[:2]:
        prompt = [tokenizer.bos_id] + tokenizer.encode(story)[:8]
        with torch.no_grad():
            generated = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=20, do_sample=False)
        mine = generate(model, prompt, 20, greedy=True, stop_id=tokenizer.eos_id)
        assert generated[0, len(prompt):].tolist() == mine
        continuations += mine
    assert len(set(continuations)) > 3  # a continuation that tells something
