"""Hooks read and replace exactly the activations that the model computes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dictlearn.errors import ConfigError
from dictlearn.models.hooks import HookPoint, capture, run_until_captured, splice, standard_hooks


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def test_parse_names():
    assert HookPoint.parse("a.b") == HookPoint("a.b", "output")
    assert str(HookPoint.parse("a.b:input")) == "a.b:input"
    assert str(HookPoint.parse("a.b:output")) == "a.b"
    with pytest.raises(ConfigError, match="expected"):
        HookPoint.parse("a.b:middle")


def test_capture_matches_hidden_states_and_mlp_pair(gpt2, tokens):
    hooks = standard_hooks(gpt2, 1)
    with torch.no_grad(), capture(gpt2, list(hooks.values())) as acts:
        out = gpt2(tokens, output_hidden_states=True)
    torch.testing.assert_close(acts[hooks["resid"]], out.hidden_states[2], rtol=0, atol=0)
    # The pair is aligned: the MLP applied to the captured input gives the captured output, and
    # the input is ln_2 of the residual stream entering the MLP sub-block.
    with torch.no_grad():
        torch.testing.assert_close(gpt2.transformer.h[1].mlp(acts[hooks["mlp_in"]]), acts[hooks["mlp_out"]])


def test_stop_after_reads_the_same_values(gpt2, tokens):
    with torch.no_grad(), capture(gpt2, ["transformer.h.0"]) as full:
        gpt2(tokens)
    with torch.no_grad(), capture(gpt2, ["transformer.h.0"], stop_after=True) as early:
        run_until_captured(gpt2, tokens)
    torch.testing.assert_close(early["transformer.h.0"], full["transformer.h.0"], rtol=0, atol=0)


def test_splice_identity_and_transcoder_of_the_mlp_itself(gpt2, tokens):
    hooks_before = len(gpt2.transformer.h[1]._forward_hooks)
    with torch.no_grad():
        clean = gpt2(tokens).logits
        with splice(gpt2, "transformer.h.1", lambda a: a):
            same = gpt2(tokens).logits
        mlp = copy.deepcopy(gpt2.transformer.h[2].mlp)  # a copy: calling the hooked module would recurse
        with splice(gpt2, "transformer.h.2.mlp:output", mlp, read="transformer.h.2.mlp:input"):
            via_read = gpt2(tokens).logits
        with splice(gpt2, "transformer.h.1", torch.zeros_like):
            ablated = gpt2(tokens).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    torch.testing.assert_close(via_read, clean)
    assert (ablated - clean).abs().max() > 1e-3
    assert len(gpt2.transformer.h[1]._forward_hooks) == hooks_before  # our handles are removed on exit


def test_bad_paths_are_one_line_errors(gpt2):
    with pytest.raises(ConfigError, match=r"transformer\.h\.9.*did you mean"):
        with capture(gpt2, ["transformer.h.9"]):
            pass
    with pytest.raises(ConfigError, match="replacement has shape"):
        with torch.no_grad(), splice(gpt2, "transformer.h.0", lambda a: a[..., :3]):
            gpt2(torch.zeros(1, 4, dtype=torch.long))


def test_stop_after_is_right_on_every_forward_with_a_block_and_its_mlp(gpt2, tokens):
    """A block's MLP is listed after the block but finishes before it: stopping must wait for both."""
    hooks = list(standard_hooks(gpt2, 1).values())
    batches = (tokens, tokens.flip(0))
    with torch.no_grad():
        references = [gpt2(batch, output_hidden_states=True).hidden_states[2] for batch in batches]
    with torch.no_grad(), capture(gpt2, hooks, stop_after=True) as acts:
        for batch, reference in zip(batches, references):
            run_until_captured(gpt2, batch)
            torch.testing.assert_close(acts["transformer.h.1"], reference, rtol=0, atol=0)
