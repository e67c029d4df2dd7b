"""The Python API on a user's tensors: `[..., d]` batches, dtypes, and one-line errors otherwise.

Every mechanism in dictlearn.dictionaries, as an SAE, a transcoder and a skip transcoder, and the
same read back through `dictlearn.load`: a [2, 3, d_in] batch gives exactly the [6, d_in] call's
values, reshaped; float64/float16/bfloat16 inputs are computed in the parameters' dtype and
returned in their own; a wrong width, a 0-d tensor, an integer tensor, a numpy array or a tensor
on another device is one InputError line naming the width and what was received.
"""

import numpy as np
import pytest
import torch

import dictlearn
from dictlearn import dictionaries
from dictlearn.errors import DictLearnError, InputError
from dictlearn.export import export

D_IN, D_OUT, D_SAE = 6, 5, 16
# the mechanisms (a cross-layer transcoder is one of them with masked weights: tests/test_crosslayer.py)
CLASSES = [getattr(dictionaries, name) for name in dictionaries.__all__
           if name != "Dictionary" and name not in dictionaries.CROSS_LAYER]
MAPPINGS = {
    "sae": {},
    "transcoder": {"d_out": D_OUT, "transcoder": True},
    "skip_transcoder": {"d_out": D_OUT, "transcoder": True, "skip_connection": True},
}


def make(cls, mapping: str = "sae", seed: int = 0) -> dictionaries.Dictionary:
    """A small dictionary with random parameters, thresholds and data scales, so that latents
    fire and every term (b_dec, skip, scales) moves the output."""
    kwargs = {"k": 3} if "k" in _arguments(cls) else {}
    model = cls(d_in=D_IN, d_sae=D_SAE, **MAPPINGS[mapping], **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype.is_floating_point and tensor.dim() > 0:
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.5)
        model.input_scale.fill_(2.0)
        model.target_scale.fill_(0.5 if model.transcoder else 2.0)  # an SAE's target is its input
        model.constrain_parameters()  # unit-norm rows as training keeps them (TopK's fold is exact only then)
    return model.eval()


def _arguments(cls) -> set[str]:
    import inspect

    return {name for klass in cls.__mro__ if "__init__" in vars(klass)
            for name in inspect.signature(klass.__init__).parameters}


def batch(*lead: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*lead, D_IN, generator=torch.Generator().manual_seed(seed))


def all_models():
    return [pytest.param(cls, mapping, id=f"{cls.__name__}-{mapping}") for cls in CLASSES for mapping in MAPPINGS]


def check_leading_dims(model) -> None:
    """encode, decode, forward (and prefix_reconstructions) of [2, 3, d] and of [d] equal the
    flattened [6, d] call exactly."""
    x3 = batch(2, 3)
    x2 = x3.reshape(6, D_IN)
    z2 = model.encode(x2)
    assert z2.count_nonzero() > 0  # latents fire: the comparison is of real values
    z3 = model.encode(x3)
    assert z3.shape == (2, 3, D_SAE) and torch.equal(z3, z2.reshape(2, 3, D_SAE))
    y2 = model.decode(z2, x2)
    y3 = model.decode(z3, x3)
    assert y3.shape == (2, 3, model.d_out) and torch.equal(y3, y2.reshape(2, 3, -1))
    assert torch.equal(model(x3), model(x2).reshape(2, 3, -1))
    assert torch.equal(model(x2), y2)
    # one vector is one row (a [1, d] call: a GEMM over 6 rows may round differently)
    x1, z1 = x2[4:5], model.encode(x2[4:5])
    assert model.encode(x2[4]).shape == (D_SAE,) and torch.equal(model.encode(x2[4]), z1[0])
    assert torch.equal(model.decode(z1[0], x1[0]), model.decode(z1, x1)[0])
    assert torch.equal(model(x1[0]), model(x1)[0])
    torch.testing.assert_close(model(x1[0]), y2[4])
    if hasattr(model, "prefix_reconstructions"):
        prefixes = model.prefix_reconstructions(x3)
        assert prefixes.shape == (len(model.prefix_widths), 2, 3, model.d_out)
        assert torch.equal(prefixes, model.prefix_reconstructions(x2).reshape(prefixes.shape))
        torch.testing.assert_close(prefixes[-1], model(x3))  # block sums: rounding may differ


@pytest.mark.parametrize("cls, mapping", all_models())
def test_leading_dims_are_flattened_and_restored(cls, mapping):
    check_leading_dims(make(cls, mapping))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("mapping", ["sae", "skip_transcoder"])
def test_loaded_export_takes_leading_dims(cls, mapping, tmp_path):
    model = make(cls, mapping)
    loaded = dictlearn.load(export(model, tmp_path / "export"))
    check_leading_dims(loaded)
    x = batch(2, 3)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)  # the fold is exact


@pytest.mark.parametrize("cls, mapping", all_models())
def test_float64_is_computed_in_float32_and_returned_in_float64(cls, mapping):
    model = make(cls, mapping)
    x32 = batch(2, 3)
    x64 = x32.double()  # the same values: the cast in is exact, so the outputs must be too
    z64 = model.encode(x64)
    assert z64.dtype == torch.float64 and torch.equal(z64, model.encode(x32).double())
    y64 = model.decode(z64, x64)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, model.decode(model.encode(x32), x32).double(), rtol=0, atol=0)
    assert model(x64).dtype == torch.float64 and torch.equal(model(x64), model(x32).double())
    # and to float32 rounding of a float64 reference: the dictionary run in float64
    reference = make(cls, mapping).double()
    torch.testing.assert_close(model(x64), reference(x64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_half_inputs_are_computed_in_float32_and_returned_in_their_dtype(dtype, mapping):
    model = make(dictionaries.TopKSAE, mapping)
    x = batch(4).to(dtype)
    z = model.encode(x)
    assert z.dtype == dtype and torch.equal(z, model.encode(x.float()).to(dtype))
    assert model(x).dtype == dtype and torch.equal(model(x), model(x.float()).to(dtype))
    assert torch.equal(model.decode(z, x), model.decode(z.float(), x.float()).to(dtype))


def test_gradients_reach_a_batched_input():
    model = make(dictionaries.TopKSAE, "skip_transcoder")
    x = batch(2, 3).requires_grad_()
    model(x).sum().backward()
    assert x.grad.shape == (2, 3, D_IN) and x.grad.abs().sum() > 0


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(InputError) as raised:
        call()
    message = str(raised.value)
    assert isinstance(raised.value, DictLearnError) and isinstance(raised.value, ValueError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_wrong_shapes_name_the_width_and_the_shape(mapping):
    model = make(dictionaries.TopKSAE, mapping)
    for method in (model.encode, model.forward):
        one_line_error(lambda: method(torch.randn(4, D_IN + 1)), "d_in=6", "(4, 7)")
        one_line_error(lambda: method(torch.randn(2, 3, D_IN - 1)), "d_in=6", "(2, 3, 5)")
        one_line_error(lambda: method(torch.randn(D_IN + 1)), "d_in=6", "(7,)")
        one_line_error(lambda: method(torch.tensor(1.0)), "d_in=6", "shape ()")
    one_line_error(lambda: model.encode(torch.randn(4, D_IN + 1)), "TopKSAE.encode", "x has shape")
    one_line_error(lambda: model.decode(torch.randn(4, D_IN), batch(4)), "TopKSAE.decode", "d_sae=16", "(4, 6)")
    one_line_error(lambda: model.decode(torch.tensor(0.0), batch(4)), "d_sae=16", "shape ()")


def test_skip_transcoder_decode_needs_the_matching_input():
    model = make(dictionaries.TopKSAE, "skip_transcoder")
    z = model.encode(batch(2, 3))
    one_line_error(lambda: model.decode(z), "decode(z, x)", "d_in=6")
    one_line_error(lambda: model.decode(z, batch(6)), "(6, 6)", "(2, 3)")
    one_line_error(lambda: model.decode(z, torch.randn(2, 3, D_IN + 1)), "d_in=6", "(2, 3, 7)")
    # an SAE's decode needs no x and ignores one
    sae = make(dictionaries.TopKSAE)
    assert torch.equal(sae.decode(sae.encode(batch(4))), sae(batch(4)))


@pytest.mark.parametrize("value", [torch.ones(4, D_IN, dtype=torch.long), torch.ones(4, D_IN, dtype=torch.bool),
                                   torch.ones(4, D_IN, dtype=torch.complex64)], ids=["int64", "bool", "complex64"])
def test_non_floating_dtypes_are_refused(value):
    model = make(dictionaries.TopKSAE)
    one_line_error(lambda: model.encode(value), f"dtype {value.dtype}", ".float()")
    one_line_error(lambda: model(value), f"dtype {value.dtype}")


def test_numpy_and_lists_name_the_conversion():
    model = make(dictionaries.TopKSAE)
    one_line_error(lambda: model.encode(np.ones((4, D_IN), np.float32)), "numpy.ndarray", "torch.from_numpy(x)", "d_in=6")
    one_line_error(lambda: model.encode([[0.0] * D_IN]), "builtins.list", "torch.as_tensor(x)")
    one_line_error(lambda: model.decode(np.ones((4, D_SAE))), "numpy.ndarray", "torch.from_numpy(z)", "d_sae=16")


def test_another_device_names_both_devices():
    """The message path of a device mismatch, on CPU: a tensor on the meta device (no data)."""
    model = make(dictionaries.TopKSAE)
    x = torch.empty(4, D_IN, device="meta")
    one_line_error(lambda: model.encode(x), "x is on meta", "dictionary is on cpu", "x.to(dictionary.device)")
    one_line_error(lambda: model.decode(torch.empty(4, D_SAE, device="meta")), "z is on meta", "on cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_input_to_a_cuda_dictionary_names_both_devices():
    model = make(dictionaries.TopKSAE).cuda()
    one_line_error(lambda: model.encode(batch(4)), "x is on cpu", "dictionary is on cuda:0")
    z = model.encode(batch(2, 3).cuda())
    assert z.shape == (2, 3, D_SAE) and z.device.type == "cuda"
