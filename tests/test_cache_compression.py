import pytest
import torch

from cache.compression import (
    SCALE_SUFFIX,
    check_codec,
    decode,
    decode_tensor,
    encode,
    encoded_nbytes_of,
    fp8_supported,
)
from cache.testing import make_activations

CODECS = ["fp32", "fp16", "bf16", "int8"] + (["fp8"] if fp8_supported() else [])


def sample() -> dict[str, torch.Tensor]:
    return make_activations(steps=1, blocks=2, tokens=64, channels=128, seed=3)


@pytest.mark.parametrize("codec", CODECS)
def test_encoded_size_matches_prediction(codec: str) -> None:
    tensors = sample()
    encoded = encode(tensors, codec)

    assert sum(tensor.nbytes for tensor in encoded.values()) == encoded_nbytes_of(tensors, codec)


def test_fp32_round_trip_exact() -> None:
    tensors = sample()
    decoded = decode(encode(tensors, "fp32"), "fp32", torch.float32)

    for name, tensor in tensors.items():
        assert torch.equal(decoded[name], tensor)


@pytest.mark.parametrize(("codec", "relative_bound"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_float_codec_relative_error(codec: str, relative_bound: float) -> None:
    tensors = sample()
    decoded = decode(encode(tensors, codec), codec, torch.float32)

    for name, tensor in tensors.items():
        error = (decoded[name] - tensor).abs()
        assert torch.all(error <= tensor.abs() * relative_bound * 1.001 + 1e-7), name


def test_int8_error_below_half_step() -> None:
    tensors = sample()
    encoded = encode(tensors, "int8")

    for name, tensor in tensors.items():
        # One step is absmax / 127 of the token's row; rounding errs by at most half a step.
        half_step = tensor.abs().amax(dim=-1, keepdim=True) / 127 / 2
        error = (decode_tensor(encoded, name, "int8", torch.float32) - tensor).abs()
        assert encoded[name].dtype == torch.int8
        assert encoded[name + SCALE_SUFFIX].shape == (64, 1)
        assert torch.all(error <= half_step * 1.0001 + 1e-7), name


@pytest.mark.skipif(not fp8_supported(), reason="torch build lacks float8_e4m3fn")
def test_fp8_error_within_mantissa() -> None:
    tensors = sample()
    encoded = encode(tensors, "fp8")

    for name, tensor in tensors.items():
        # e4m3 keeps 3 mantissa bits (relative half-ulp 2^-4); subnormals are spaced 2^-9 * scale.
        scale = encoded[name + SCALE_SUFFIX]
        bound = torch.maximum(tensor.abs() * 2.0**-4, scale * 2.0**-10)
        error = (decode_tensor(encoded, name, "fp8", torch.float32) - tensor).abs()
        assert torch.all(error <= bound * 1.001 + 1e-7), name


def test_zero_rows_decode_to_zero() -> None:
    tensors = {"s000.b00.k": torch.zeros(4, 8)}
    decoded = decode(encode(tensors, "int8"), "int8", torch.float32)

    assert torch.equal(decoded["s000.b00.k"], torch.zeros(4, 8))


def test_decode_restores_source_dtype() -> None:
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in sample().items()}
    decoded = decode(encode(tensors, "int8"), "int8", torch.bfloat16)

    assert all(tensor.dtype == torch.bfloat16 for tensor in decoded.values())


def test_encode_rejects_reserved_suffix() -> None:
    with pytest.raises(ValueError, match="reserved"):
        encode({"s000.b00.k" + SCALE_SUFFIX: torch.zeros(2, 2)}, "int8")


def test_check_codec_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="int4"):
        check_codec("int4")


def test_fp16_keeps_bfloat16_exact() -> None:
    tensors = {"s000.b00.k": torch.randn(8, 16).to(torch.bfloat16)}
    encoded = encode(tensors, "fp16")

    assert encoded["s000.b00.k"].dtype == torch.bfloat16
    assert torch.equal(decode(encoded, "fp16", torch.bfloat16)["s000.b00.k"], tensors["s000.b00.k"])


def test_fp16_out_of_range_stays_finite() -> None:
    tensors = {"s000.b00.hidden": torch.tensor([[1.0e6, -2.0e5, 3.0]])}
    decoded = decode(encode(tensors, "fp16"), "fp16", torch.float32)["s000.b00.hidden"]

    assert torch.isfinite(decoded).all()
    assert torch.allclose(decoded, tensors["s000.b00.hidden"], rtol=2.0**-8)
