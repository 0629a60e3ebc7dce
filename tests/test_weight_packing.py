"""Per-request packed linear weights: same results as plain F.linear, stock modules restored, guards."""

from __future__ import annotations

import pytest
import torch

from tests.test_masked_inference import (  # noqa: F401 (pipe, embedding and cache are fixtures)
    TOLERANCE,
    cache,
    embedding,
    identical_content_latents,
    masked_relative_difference,
    pipe,
    rectangle_token_mask,
)
from workers.masked import inference, weight_packing
from workers.masked.weight_packing import mkl_packing_available, packed_linears

pytestmark = pytest.mark.skipif(not mkl_packing_available(), reason="this PyTorch build has no MKL packed GEMM")


def small_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16, bias=False))


@pytest.mark.parametrize("rows", [16, 40])
def test_packed_layers_match_plain(rows: int) -> None:
    model = small_mlp()
    x = torch.randn(1, rows, 32)
    expected = model(x)
    with packed_linears(model) as count:
        packed = model(x)
        again = model(x)

    assert count == 2
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(packed, again)


def test_layers_are_restored_and_copies_dropped() -> None:
    model = small_mlp()
    with packed_linears(model):
        model(torch.randn(20, 32))
        wrappers = [vars(layer)["forward"] for layer in model if isinstance(layer, torch.nn.Linear)]

    assert all(wrapper.packed for wrapper in wrappers)
    assert all("forward" not in vars(layer) for layer in model)


def test_few_rows_stay_plain() -> None:
    model = small_mlp()
    with packed_linears(model):
        model(torch.randn(4, 32))
        wrappers = [vars(layer)["forward"] for layer in model if isinstance(layer, torch.nn.Linear)]

    assert not any(wrapper.packed for wrapper in wrappers)


@pytest.mark.parametrize(
    ("variable", "value"), [("EDITOR_PACK_WEIGHTS", "0"), ("EDITOR_PACK_WEIGHTS_MAX_MB", "0")]
)
def test_off_switch_and_budget_leave_layers_plain(monkeypatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    model = small_mlp()
    with packed_linears(model) as count:
        assert all("forward" not in vars(layer) for layer in model)

    assert count == 0


def test_half_precision_model_stays_plain() -> None:
    model = small_mlp().to(torch.bfloat16)
    with packed_linears(model) as count:
        pass

    assert count == 0


def test_bad_budget_names_the_setting(monkeypatch) -> None:
    monkeypatch.setenv("EDITOR_PACK_WEIGHTS_MAX_MB", "lots")
    with pytest.raises(ValueError, match="EDITOR_PACK_WEIGHTS_MAX_MB='lots'"):
        with packed_linears(small_mlp()):
            pass


def wrong_packing(monkeypatch) -> None:
    """Make every packed copy 5% off its weight, so results show whether packed copies were used."""
    pack = weight_packing.pack_weight
    monkeypatch.setattr(weight_packing, "pack_weight", lambda weight, rows: pack(weight * 1.05, rows))


def test_masked_pass_with_packed_weights_stays_exact(pipe, embedding, cache, monkeypatch) -> None:
    """Pack from one row and step so the tiny model's projections are packed; a wrong packed copy must show."""
    monkeypatch.setattr(weight_packing, "MIN_PACKED_ROWS", 1)
    monkeypatch.setattr(inference, "MIN_PACKED_STEPS", 1)
    token_mask = rectangle_token_mask(3, 3)
    activations = cache["kv"]
    exact = identical_content_latents(pipe, activations, embedding, token_mask)

    wrong_packing(monkeypatch)
    wrong = identical_content_latents(pipe, activations, embedding, token_mask)

    assert masked_relative_difference(exact, activations.latents[-1], token_mask) < TOLERANCE
    assert masked_relative_difference(wrong, activations.latents[-1], token_mask) > 100 * TOLERANCE


def test_requests_with_few_steps_stay_plain(pipe, embedding, cache, monkeypatch) -> None:
    """The tiny model's 3 steps are below MIN_PACKED_STEPS, so even a wrong packed copy is never used."""
    monkeypatch.setattr(weight_packing, "MIN_PACKED_ROWS", 1)
    wrong_packing(monkeypatch)
    token_mask = rectangle_token_mask(3, 3)
    latents = identical_content_latents(pipe, cache["kv"], embedding, token_mask)

    assert masked_relative_difference(latents, cache["kv"].latents[-1], token_mask) < TOLERANCE
