"""`dictlearn harvest`: the file holds exactly the model's activations, row by row, and nothing else.

References are computed independently here: the windows from the corpus bytes by hand, following
the file's documents/ record (stream = excerpt0 BOS excerpt1 BOS ..., training excerpts first, then
the held-out ones; window = BOS + the next context - 1 bytes), and the activations from
`output_hidden_states` / the MLP module itself, never through dictlearn's capture. Which documents
and excerpts the record names is tested against the rules in tests/test_heldout_documents.py.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import dictlearn
from dictlearn.cli import main as cli_main
from dictlearn.data import ActivationDataModule, H5Array
from dictlearn.harvest import activations as harvest_module
from dictlearn.harvest import default_hooks, harvest
from dictlearn.errors import ConfigError, DataError
from dictlearn.models.loading import LanguageModel
from dictlearn.models.tiny import TINY_DIR, TINY_NAME, ByteTokenizer

BOS = ByteTokenizer.bos_token_id
CONTEXT = 32
LAYER = 1
RESID, MLP_IN, MLP_OUT = "transformer.h.1", "transformer.h.1.mlp:input", "transformer.h.1.mlp"
SRC_ROOT = str(Path(dictlearn.__file__).resolve().parents[1])


def _config() -> GPT2Config:
    return GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=3, n_head=2, bos_token_id=BOS,
                      eos_token_id=BOS, dictlearn_tokenizer="byte")


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(GPT2LMHeadModel(_config()).eval(), ByteTokenizer(), "test/random-gpt2", "r1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, lm) -> Path:
    """The same random model saved as a folder that `load_model(DIR)` pairs with ByteTokenizer."""
    folder = tmp_path_factory.mktemp("model")
    lm.model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six small text files of different lengths, so documents end mid-window."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        lines = [f"def f{i}_{j}(x):\n    return x * {i + j} + {'y' * (j % 5)}\n" for j in range(4 + 3 * i)]
        (folder / f"m{i}.py").write_text("".join(lines))
    return folder


def reference_windows(corpus: Path, path: Path, context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, doc_index) [n_windows, context] built by hand from the files' bytes and the file's
    documents/ record: the training excerpts in order, separated by BOS, cut into windows of BOS +
    the next context - 1 bytes; then the held-out excerpts the same way. A last partial window is
    padded (causal: the padding changes no row before it)."""
    names = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*") if p.is_file())
    with h5py.File(path, "r") as f:
        g = f["documents"]
        record = list(zip(g["name"].asstr()[()], g["start"][()], g["stop"][()], g["heldout"][()]))
    take, rows, doc_rows = context - 1, [], []
    for side in (False, True):
        tokens, docs = [], []
        for name, start, stop, heldout in record:
            if heldout == side:
                data = list((corpus / name).read_bytes()[start:stop])
                tokens += ([BOS] if tokens else []) + data
                docs += ([-1] if docs else []) + [names.index(name)] * len(data)
        n = -(-len(tokens) // take)
        tokens, docs = tokens + [BOS] * (n * take - len(tokens)), docs + [-1] * (n * take - len(docs))
        rows += [[BOS] + tokens[i * take:(i + 1) * take] for i in range(n)]
        doc_rows += [[-1] + docs[i * take:(i + 1) * take] for i in range(n)]
    return torch.tensor(rows), torch.tensor(doc_rows)


def f_windows(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f.attrs["windows"])


def _read(path: Path) -> dict[str, np.ndarray]:
    """The root datasets (the concepts/ group of this Python corpus: tests/test_labels.py)."""
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in f if isinstance(f[key], h5py.Dataset)}


def _harvest(lm, corpus, out, tokens, **kwargs) -> Path:
    kwargs = {"split": "all", "batch_size": 5, "progress": False, **kwargs}
    return harvest(lm, [RESID, MLP_IN, MLP_OUT], out, tokens, CONTEXT, corpus=corpus, **kwargs)


@pytest.fixture(scope="module")
def kept_file(lm, corpus, tmp_path_factory) -> Path:
    """Every whole window with BOS positions kept: the reference the other files are compared to."""
    return _harvest(lm, corpus, tmp_path_factory.mktemp("kept") / "kept.h5", "all", exclude_special=False)


# ------------------------------------------------------------------------------ contents
def test_rows_are_the_models_residual_stream_row_by_row(lm, corpus, tmp_path):
    path = _harvest(lm, corpus, tmp_path / "acts.h5", 500)  # not a multiple of 31 rows per window
    data = _read(path)
    windows, doc_index = reference_windows(corpus, path)
    with torch.no_grad():
        hidden = lm.model(windows, output_hidden_states=True).hidden_states[LAYER + 1]  # after block 1
    w, p = data["window_index"].astype(np.int64), data["position"].astype(np.int64)
    assert len(w) == 500 and data[RESID].shape == (500, 32)
    # Rows run window by window, position by position, skipping only position 0 (BOS) here.
    expected = [(i, j) for i in range(windows.shape[0]) for j in range(CONTEXT) if doc_index[i, j] >= 0][:500]
    assert list(zip(w.tolist(), p.tolist())) == expected
    np.testing.assert_array_equal(data["token_ids"], windows[w, p].numpy())
    np.testing.assert_array_equal(data["doc_index"], doc_index[w, p].numpy())
    torch.testing.assert_close(torch.from_numpy(data[RESID]), hidden[w, p], rtol=1e-5, atol=1e-5)


def test_transcoder_pair_aligns_row_by_row(lm, kept_file):
    data = _read(kept_file)
    mlp_in, mlp_out = torch.from_numpy(data[MLP_IN]), torch.from_numpy(data[MLP_OUT])
    assert mlp_in.shape == (len(data["token_ids"]), 32) and mlp_out.shape == mlp_in.shape
    with torch.no_grad():
        torch.testing.assert_close(lm.model.transformer.h[LAYER].mlp(mlp_in), mlp_out, rtol=1e-5, atol=1e-5)
    # The input is post-LayerNorm: ln_2 of a fresh model has weight 1 and bias 0, so every row has
    # mean 0 and (biased) variance v / (v + eps) just under 1; the raw residual stream (v ~ 1e-3
    # at init) has neither.
    ln = lm.model.transformer.h[LAYER].ln_2
    assert torch.equal(ln.weight, torch.ones(32)) and torch.equal(ln.bias, torch.zeros(32))
    torch.testing.assert_close(mlp_in.mean(-1), torch.zeros(len(mlp_in)), rtol=0, atol=1e-5)
    variance = mlp_in.var(-1, unbiased=False)
    assert (variance < 1 + 1e-5).all() and (variance > 0.9).all()


def test_exclude_special_drops_exactly_the_bos_rows(lm, corpus, kept_file, tmp_path):
    kept = _read(kept_file)
    windows, doc_index = reference_windows(corpus, kept_file)
    with h5py.File(kept_file) as f:
        heldout = f["documents/heldout"][()]
    # keep_special: every position of every whole window
    assert len(kept["token_ids"]) == f_windows(kept_file) * CONTEXT <= windows.numel()
    is_bos = kept["token_ids"] == BOS
    np.testing.assert_array_equal(is_bos, kept["doc_index"] == -1)
    # separators between documents of each side; at most one per side cut by its last window
    n_separators = (~heldout).sum() - 1 + max(heldout.sum() - 1, 0)
    n_windows = f_windows(kept_file)
    assert n_windows + n_separators - 2 <= is_bos.sum() <= n_windows + n_separators
    excluded = _read(_harvest(lm, corpus, tmp_path / "ex.h5", "all"))
    assert len(excluded["token_ids"]) == (~is_bos).sum() and (excluded["token_ids"] != BOS).all()
    for key in ("token_ids", "doc_index", "window_index", "position"):
        np.testing.assert_array_equal(excluded[key], kept[key][~is_bos])
    for hook in (RESID, MLP_IN, MLP_OUT):
        np.testing.assert_allclose(excluded[hook], kept[hook][~is_bos], rtol=1e-6, atol=1e-6)


def test_attributes_and_layout(kept_file):
    with h5py.File(kept_file, "r") as f:
        attrs = dict(f.attrs)
        assert {f[h].attrs["hook_name"] for h in (RESID, MLP_IN, MLP_OUT)} == {RESID, MLP_IN, MLP_OUT}
        assert f["position"].dtype == np.int16 and f["token_ids"].dtype == np.int32
        assert f[RESID].chunks is None and f[RESID].compression is None  # contiguous (fastest to read)
        rows = len(f["token_ids"])
    assert attrs["model_name"] == "test/random-gpt2" and attrs["model_revision"] == "r1"
    assert attrs["split"] == "all" and attrs["context_size"] == CONTEXT and attrs["tokens"] == rows
    assert not attrs["exclude_special"] and attrs["dtype"] == "float32" and attrs["seed"] == 0
    assert attrs["complete"] and Path(attrs["corpus"]).is_absolute() and Path(attrs["corpus"]).is_dir()


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_half_precision_storage_reads_back(lm, corpus, kept_file, tmp_path, dtype, tolerance):
    path = _harvest(lm, corpus, tmp_path / f"{dtype}.h5", "all", exclude_special=False, dtype=dtype)
    reference = _read(kept_file)
    with h5py.File(path, "r") as f:
        stored = f[RESID]
        assert stored.dtype == (np.uint16 if dtype == "bfloat16" else np.float16)
        assert (stored.attrs.get("dtype") == "bfloat16") == (dtype == "bfloat16")
        assert f.attrs["dtype"] == dtype
    for hook in (RESID, MLP_OUT):
        array = H5Array(path, hook)
        assert array.stored_dtype == dtype
        exact = torch.from_numpy(reference[hook])
        # round to nearest: relative error at most half an ulp, 2^-(mantissa bits + 1)
        error = (array.read(0, len(array)) - exact).abs()
        assert (error <= tolerance * exact.abs() + 1e-7).all()
        assert error.max() > 0  # really stored in half precision
    x, _ = next(iter(ActivationDataModule(str(path), input_key=RESID, batch_size=64, block_size=32).train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (64, 32)


def test_float16_overflow_is_refused(lm, corpus, tmp_path):
    loud = copy.deepcopy(lm)
    with torch.no_grad():
        loud.model.transformer.wte.weight.fill_(1e5)  # residual stream values ~1e5 > float16 max 65504
    with pytest.raises(DataError, match="overflow float16"):
        _harvest(loud, corpus, tmp_path / "o.h5", 100, dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_the_written_file_trains(kept_file):
    data = ActivationDataModule(str(kept_file), input_key=MLP_IN, target_key=MLP_OUT, batch_size=64, block_size=32)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (64, 32) and y.shape == (64, 32)
    info = data.provenance()
    assert info["hook_name"] == MLP_IN and info["hook_name_out"] == MLP_OUT
    assert info["model_name"] == "test/random-gpt2" and info["context_size"] == CONTEXT
    for name in ("corpus", "split", "tokens", "exclude_special", "seed", "dictlearn_version"):
        assert name in info


def test_layers_after_the_deepest_hook_never_run(lm, corpus, tmp_path):
    calls = []
    handle = lm.model.transformer.h[LAYER + 1].register_forward_hook(lambda *args: calls.append(1))
    try:
        _harvest(lm, corpus, tmp_path / "a.h5", 200)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("config_class", ["GPTNeoXConfig", "LlamaConfig"])
def test_other_families_same_code(corpus, tmp_path, config_class):
    """Pythia-style (parallel attention + MLP) and Llama-style blocks: resid = hidden state, MLP pair aligned."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=257, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, bos_token_id=BOS, eos_token_id=BOS)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    lm = LanguageModel(model, ByteTokenizer(), config.model_type, None)
    hooks = default_hooks(model)
    path = harvest(lm, hooks, tmp_path / "a.h5", 200, CONTEXT, corpus=corpus, split="all", progress=False)
    data = _read(path)
    windows, _ = reference_windows(corpus, path)
    w, p = data["window_index"].astype(np.int64), data["position"].astype(np.int64)
    with torch.no_grad():
        hidden = model(windows[: w.max() + 1], output_hidden_states=True).hidden_states[LAYER + 1]
        mlp = model.get_submodule(hooks[2])
        torch.testing.assert_close(mlp(torch.from_numpy(data[hooks[1]])), torch.from_numpy(data[hooks[2]]),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(data[hooks[0]]), hidden[w, p], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ failures
@pytest.mark.parametrize("stop", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_harvest_leaves_nothing(lm, corpus, tmp_path, monkeypatch, stop):
    real, calls = harvest_module._Writer.write, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:  # after one batch has been written
            raise stop
        return real(self, *args)

    monkeypatch.setattr(harvest_module._Writer, "write", failing)
    with pytest.raises(type(stop)):
        _harvest(lm, corpus, tmp_path / "acts.h5", 300)
    assert list(tmp_path.iterdir()) == []  # neither acts.h5 nor its temp file


def test_short_corpus_is_an_error_not_a_short_file(lm, corpus, kept_file, tmp_path):
    available = len(_read(kept_file)["token_ids"])
    message = rf"has {available} tokens to harvest in \d+ whole windows.*fewer than --tokens {available * 2}"
    with pytest.raises(DataError, match=message):
        _harvest(lm, corpus, tmp_path / "a.h5", available * 2, exclude_special=False)
    assert list(tmp_path.iterdir()) == []


def test_default_hooks_are_the_middle_layers_standard_sites(lm):
    assert default_hooks(lm.model) == [RESID, MLP_IN, MLP_OUT]  # 3 layers -> layer 1
    assert default_hooks(lm.model, 2) == ["transformer.h.2", "transformer.h.2.mlp:input", "transformer.h.2.mlp"]
    with pytest.raises(ConfigError, match="--layer 3"):
        default_hooks(lm.model, 3)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main(["harvest", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["--hooks", "transformer.h.1.mlpp"], "hook 'transformer.h.1.mlpp': the model has no module"),
    (["--hooks", "transformer.h.1.mlp,transformer.h.1.mlp:output"], "are the same site"),
    (["--tokens", "0"], "argument --tokens: expected a positive whole number"),
    (["--tokens", "lots"], "argument --tokens: expected a positive whole number"),
    (["--context", "65"], "--context 65: must be at least 2 and at most the model's maximum, 64"),
    (["--context", "1"], "--context 1"),
    (["--layer", "7"], "--layer 7"),
    (["--layers", "0,3"], "--layers: the model has no layer 3 (it has layers 0..2)"),
    (["--layers", "2,1"], "in increasing order (e.g. 1,2)"),
    (["--layers", "1,1"], "in increasing order (e.g. 1)"),
    (["--layers", "one"], "argument --layers: expected 'all' or layer indices"),
    (["--layers", "all", "--hooks", RESID], "drop --hooks or drop --layers"),
    (["--layers", "all", "--layer", "1"], "drop --layer or drop --layers"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--corpus", "/nonexistent/texts"], "corpus /nonexistent/texts: no such file or folder"),
])  # fmt: skip
def test_cli_bad_inputs_exit_2_with_one_line(capsys, model_dir, corpus, tmp_path, argv, message):
    out = tmp_path / "acts.h5"
    base = ["--model", str(model_dir), "--corpus", str(corpus), "--split", "all", "--quiet", "--out", str(out)]
    code, stdout, stderr = _cli(capsys, *base, *argv)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("dictlearn: error: ") and message in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_layers_all_is_every_layers_standard_hooks_row_aligned(capsys, lm, model_dir, corpus, tmp_path):
    """--layers all: [resid, mlp_in, mlp_out] of layers 0, 1, 2 in one file, each equal to the file a
    single-layer harvest writes on the same rows, and each MLP pair aligned (mlp_out = MLP(mlp_in))."""
    out = tmp_path / "all.h5"
    code, stdout, _ = _cli(capsys, "--model", str(model_dir), "--corpus", str(corpus), "--split", "all", "--quiet",
                           "--tokens", "300", "--context", str(CONTEXT), "--layers", "all", "--out", str(out))
    assert code == 0 and "x 9 hooks" in stdout
    data = _read(out)
    hooks = [h for layer in range(3) for h in default_hooks(lm.model, layer)]
    with h5py.File(out) as f:
        assert [k for k in f if k in hooks] == sorted(hooks) and all(f[h].shape == (300, 32) for h in hooks)
    for layer in range(3):
        single = _read(harvest(lm, default_hooks(lm.model, layer), tmp_path / f"l{layer}.h5", 300, CONTEXT,
                               corpus=corpus, split="all", progress=False))
        for key in [*default_hooks(lm.model, layer), "token_ids", "window_index", "position"]:
            np.testing.assert_array_equal(data[key], single[key])
        resid, mlp_in, mlp_out = (torch.from_numpy(data[h]) for h in default_hooks(lm.model, layer))
        with torch.no_grad():
            torch.testing.assert_close(lm.model.transformer.h[layer].mlp(mlp_in), mlp_out, rtol=1e-5, atol=1e-5)
    two = _read(harvest(lm, harvest_module.layer_hooks(lm.model, [0, 2]), tmp_path / "two.h5", 300, CONTEXT,
                        corpus=corpus, split="all", progress=False))
    assert set(two) - {"token_ids", "doc_index", "window_index", "position"} == \
        set(default_hooks(lm.model, 0) + default_hooks(lm.model, 2))
    with pytest.raises(ConfigError, match="increasing order"):
        harvest_module.layer_hooks(lm.model, [1, 0])


def test_cli_unwritable_out_and_missing_out(capsys, model_dir, corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, stderr = _cli(capsys, "--model", str(model_dir), "--corpus", str(corpus), "--out", str(blocker / "x.h5"))
    assert code == 2 and stderr.count("\n") == 1 and "is a file, not a folder" in stderr  # checked before the model loads
    code, _, stderr = _cli(capsys, "--model", str(model_dir))
    assert code == 2 and stderr.count("\n") == 1 and "--out" in stderr


def test_cli_writes_the_file_and_a_summary(capsys, model_dir, corpus, tmp_path):
    out = tmp_path / "sub" / "acts.h5"
    code, stdout, stderr = _cli(capsys, "--model", str(model_dir), "--corpus", str(corpus), "--split", "all",
                                "--tokens", "300", "--context", str(CONTEXT), "--dtype", "bfloat16", "--seed", "7",
                                "--out", str(out))
    # no progress bar when stderr is not a terminal; 300 rows read too few documents to hold any out
    assert code == 0 and stderr.count("\n") == 1 and "too few to hold out whole ones" in stderr
    assert stdout.count("\n") == 1 and "wrote 300 rows x 3 hooks" in stdout and "tokens/s" in stdout
    with h5py.File(out, "r") as f:
        assert f.attrs["seed"] == 7 and f.attrs["tokens"] == 300 and f.attrs["dtype"] == "bfloat16"
        assert sorted(f) == sorted([RESID, MLP_IN, MLP_OUT, "token_ids", "doc_index", "window_index", "position",
                                    "concepts", "documents"])  # a Python corpus: concept labels (tests/test_labels.py)
        assert f.attrs["model_name"] == str(model_dir.resolve())


@pytest.mark.slow
def test_sigterm_removes_the_temp_file_and_exits_143(model_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "big.txt").write_text("x = 1\n" * 200_000)  # 1.2 MB: far more than the harvest gets to
    out = tmp_path / "out" / "acts.h5"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (SRC_ROOT, os.environ.get("PYTHONPATH")))),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dictlearn.cli", "harvest", "--model", str(model_dir), "--corpus", str(corpus),
               "--split", "all", "--tokens", "1000000", "--context", "64", "--batch-size", "1", "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # imports alone can take 30 s on a busy 2-core machine
    while not (out.parent.exists() and any(out.parent.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)  # inside the batch loop
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    # neither the temporary file nor the folder the harvest created for it is left behind
    assert "interrupted" in stderr and not out.parent.exists()


# ------------------------------------------------------------------------------ embedded model
@pytest.mark.slow
@pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="embedded weights not built yet")
def test_embedded_default_through_the_cli(capsys, tmp_path):
    out = tmp_path / "acts.h5"
    code, stdout, _ = _cli(capsys, "--tokens", "2000", "--quiet", "--out", str(out))
    assert code == 0 and "wrote 2000 rows x 3 hooks" in stdout
    with h5py.File(out, "r") as f:
        layer = 2  # 4 blocks -> the middle one
        assert f.attrs["model_name"] == TINY_NAME and f.attrs["corpus"].startswith("python-stdlib-")
        assert f.attrs["split"] == "train" and f.attrs["exclude_special"] and f.attrs["context_size"] == 256
        hooks = [f"transformer.h.{layer}", f"transformer.h.{layer}.mlp:input", f"transformer.h.{layer}.mlp"]
        assert all(f[h].shape == (2000, 128) for h in hooks)
        assert (f["token_ids"][()] != BOS).all()
    data = ActivationDataModule(str(out), input_key=hooks[0], batch_size=256, block_size=64)
    assert next(iter(data.train_dataloader()))[0].shape == (256, 128)
