"""The embedded model and load_model: shipped weights, held-out quality, folders, hub names."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter

import pytest
import torch
import transformers

from dictlearn.models.corpus import iter_documents, iter_windows
from dictlearn.errors import ConfigError, DictLearnError
from dictlearn.models.hooks import capture, standard_hooks
from dictlearn.models.loading import HFTokenizer, load_model
from dictlearn.models.tiny import TINY_DIR, TINY_NAME, ByteTokenizer, load_byte_model, load_tiny
from dictlearn.models.train_tiny import bits_per_byte, learning_rate, main, unigram_entropy_bits

BOS = 256
SAMPLE_WINDOWS = 128  # 128 x 256 tokens: 32 KB of held-out source (6 files), seconds on 2 CPUs


@pytest.fixture(scope="module")
def tiny():
    return load_model(None)


@pytest.fixture(scope="module")
def heldout_sample():
    """The first SAMPLE_WINDOWS held-out windows of the stdlib, context 256 -> [n, 256] long."""
    windows = iter_windows(iter_documents(None, "heldout"), ByteTokenizer(), 256)
    return torch.stack([w.tokens for _, w in zip(range(SAMPLE_WINDOWS), windows)])


def test_embedded_model_loads_offline_with_its_byte_tokenizer(tiny):
    assert tiny.name == TINY_NAME and load_model(TINY_NAME).name == TINY_NAME
    assert isinstance(tiny.model, transformers.GPT2LMHeadModel) and not tiny.model.training
    assert isinstance(tiny.tokenizer, ByteTokenizer) and tiny.tokenizer.bos_token_id == BOS
    assert isinstance(load_tiny(), transformers.GPT2LMHeadModel) and not load_tiny().training
    config = tiny.model.config
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.n_positions) == (257, BOS, BOS, 256)
    weights = (TINY_DIR / "model.safetensors").read_bytes()
    assert tiny.revision == "sha256:" + hashlib.sha256(weights).hexdigest()[:16]
    assert sorted(p.name for p in TINY_DIR.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    assert len(weights) < 8_000_000  # ships inside the package
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in TINY_DIR.iterdir())  # readable once installed


def test_loading_prints_no_progress_bar(capfd):
    load_model(None)
    assert "Loading" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()  # the caller's setting is restored


def test_embedded_model_predicts_heldout_source_far_better_than_byte_frequencies(tiny, heldout_sample):
    tokens = heldout_sample
    with torch.no_grad():
        logits = tiny.model(input_ids=tokens).logits.double()
    # Independent float64 reference: position t predicts token t+1; BOS is never a target.
    log_probs = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    predicted = tokens[:, 1:] != BOS
    bpb = float(-log_probs[predicted].mean() / math.log(2))
    counts = Counter(tokens[:, 1:][predicted].tolist())
    n = sum(counts.values())
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())

    assert n == SAMPLE_WINDOWS * 255 - int((tokens[:, 1:] == BOS).sum()) and max(counts) < 256
    script_bpb, script_n = bits_per_byte(tiny.model, tokens, BOS)
    assert script_n == n and script_bpb == pytest.approx(bpb, abs=1e-4)
    assert unigram_entropy_bits(tokens, BOS) == pytest.approx(entropy, abs=1e-9)
    # On this sample (Python 3.11 stdlib): bpb 2.458, unigram entropy 4.498 (docs/embedded_model.md).
    assert bpb <= 0.6 * entropy, (bpb, entropy)


def test_training_record_matches_the_shipped_model(tiny):
    record = json.loads((TINY_DIR / "training.json").read_text())
    assert record["command"].startswith("python -m dictlearn.models.train_tiny --out")
    assert record["parameters"] == sum(p.numel() for p in tiny.model.parameters())
    assert record["context"] == tiny.model.config.n_positions
    assert record["tokens_seen"] == record["steps"] * record["batch"] * record["context"]
    assert record["heldout_bits_per_byte"] <= 0.6 * record["heldout_unigram_entropy_bits"]


def test_embedded_model_is_hookable_like_any_gpt2(tiny):
    hooks = standard_hooks(tiny.model, 1)
    with capture(tiny.model, list(hooks.values())) as acts:
        tiny.model(input_ids=torch.tensor([[BOS, *tiny.tokenizer.encode("import os\n")]]))
    assert acts[hooks["resid"]].shape == (1, 11, 128) and acts[hooks["mlp_in"]].shape == (1, 11, 128)


def test_a_copied_byte_model_folder_loads_with_the_byte_tokenizer(tiny, tmp_path):
    shutil.copytree(TINY_DIR, tmp_path / "copy")
    copy = load_model(str(tmp_path / "copy"))
    assert isinstance(copy.tokenizer, ByteTokenizer) and copy.revision == tiny.revision
    assert copy.name == str((tmp_path / "copy").resolve())
    ids = torch.tensor([[BOS, *copy.tokenizer.encode("def f():\n    return 1\n")]])
    with torch.no_grad():
        assert torch.equal(copy.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)


def test_a_transformers_folder_loads_with_its_own_tokenizer_without_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3, "!": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # A tokenizer that prepends BOS by default (as Llama's does): load_model's must not.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="[UNK]")
    hf.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=5, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=1, eos_token_id=1)
    saved = transformers.GPT2LMHeadModel(config).eval()
    saved.save_pretrained(tmp_path)

    lm = load_model(str(tmp_path))
    assert isinstance(lm.tokenizer, HFTokenizer) and lm.tokenizer.bos_token_id == 1
    assert hf.encode("hello world !") == [1, 2, 3, 4] and lm.tokenizer.encode("hello world !") == [2, 3, 4]
    assert lm.name == str(tmp_path.resolve()) and lm.revision is None and not lm.model.training
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, saved(input_ids=ids).logits)


def test_hub_names_come_only_from_the_local_cache():
    with pytest.raises(ConfigError) as error:
        load_model("dictlearn-tests/no-such-model")
    assert str(error.value) == ("model 'dictlearn-tests/no-such-model': not in the local Hugging Face cache and "
                                "dictlearn never downloads; pass a local folder (--model DIR) or download it first")


def test_bad_folders_and_missing_weights_raise_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        load_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(DictLearnError, match=r"model.safetensors is missing; .*train_tiny --out"):
        (tmp_path / "config.json").write_text(json.dumps({"dictlearn_tokenizer": "byte"}))
        load_byte_model(tmp_path)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    peak, steps, warmup = 2.0, 101, 10
    assert [learning_rate(s, steps, peak, warmup) for s in range(3)] == pytest.approx([0.2, 0.4, 0.6])
    assert learning_rate(warmup, steps, peak, warmup) == pytest.approx(peak)
    midpoint = warmup + (steps - warmup - 1) / 2  # cos(pi/2) = 0: halfway between peak and peak/10
    assert learning_rate(int(midpoint), steps, peak, warmup) == pytest.approx(0.2 + 0.9 * peak / 2)
    assert learning_rate(steps - 1, steps, peak, warmup) == pytest.approx(peak / 10)


def test_training_script_writes_a_loadable_folder_atomically(tmp_path, capsys):
    out = tmp_path / "model"
    record = main(["--out", str(out), "--steps", "3", "--batch", "2", "--context", "32",
                   "--train-windows", "16", "--eval-windows", "4", "--log-every", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left beside it
    assert out.stat().st_mode & 0o777 == 0o755 and all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    assert json.loads((out / "training.json").read_text()) == record
    assert record["tokens_seen"] == 3 * 2 * 32 and len(record["curve"]) == 3
    first = [w.tokens for _, w in zip(range(4), iter_windows(iter_documents(None, "heldout"), ByteTokenizer(), 32))]
    assert record["heldout_predicted_bytes"] == int((torch.stack(first)[:, 1:] != BOS).sum())
    assert record["command"] == "python -m dictlearn.models.train_tiny --out " + str(out) + (
        " --steps 3 --batch 2 --context 32 --train-windows 16 --eval-windows 4 --log-every 1")
    lm = load_model(str(out))
    assert isinstance(lm.tokenizer, ByteTokenizer) and lm.model.config.n_positions == 32
    assert "step 3/3" in capsys.readouterr().out
