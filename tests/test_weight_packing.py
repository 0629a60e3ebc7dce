"""Packed linear weights: same results as plain F.linear, one copy per layer kept and renewed, guards."""

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
from workers.masked import weight_packing
from workers.masked.weight_packing import forget_packed_copies, mkl_packing_available, packed_bytes, packed_linears

pytestmark = pytest.mark.skipif(not mkl_packing_available(), reason="this PyTorch build has no MKL packed GEMM")


@pytest.fixture(autouse=True)
def fresh_copies():
    """Packed copies outlive a request; each test starts and ends without any, so none leaks between tests."""
    forget_packed_copies()
    yield
    forget_packed_copies()


def small_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16, bias=False))


def test_one_copy_serves_any_row_count() -> None:
    model = small_mlp()
    inputs = [torch.randn(1, rows, 32) for rows in (16, 40, 23)]
    expected = [model(x) for x in inputs]
    with packed_linears(model) as count:
        packed = [model(x) for x in inputs]
        again = model(inputs[0])

    assert count == 2
    for got, want in zip(packed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(packed[0], again)


def test_copies_kept_across_requests() -> None:
    model = small_mlp()
    with packed_linears(model):
        model(torch.randn(20, 32))
    first_copies = {id(weight_packing._copies[layer].tensor) for layer in model if isinstance(layer, torch.nn.Linear)}
    with packed_linears(model):
        model(torch.randn(30, 32))
    second_copies = {id(weight_packing._copies[layer].tensor) for layer in model if isinstance(layer, torch.nn.Linear)}

    assert len(first_copies) == 2
    assert second_copies == first_copies
    assert packed_bytes() >= sum(layer.weight.numel() * 4 for layer in model if isinstance(layer, torch.nn.Linear))
    assert all("forward" not in vars(layer) for layer in model)


def test_changed_weight_is_packed_again() -> None:
    model = small_mlp()
    x = torch.randn(20, 32)
    with packed_linears(model):
        model(x)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    expected = model(x)
    with packed_linears(model):
        packed = model(x)

    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)


def test_few_rows_stay_plain() -> None:
    model = small_mlp()
    with packed_linears(model):
        model(torch.randn(4, 32))

    assert packed_bytes() == 0


def test_budget_counts_copies_of_other_models(monkeypatch) -> None:
    """Each model has a 2 MiB weight, and a budget of 3 (MiB) has room for the packed copy of one."""
    monkeypatch.setenv("EDITOR_PACK_WEIGHTS_MAX_MB", "3")
    first, second = torch.nn.Linear(512, 1024), torch.nn.Linear(512, 1024)
    with packed_linears(first) as packed_first:
        first(torch.randn(20, 512))
    with packed_linears(first) as again, packed_linears(second) as packed_second:
        pass

    assert (packed_first, again, packed_second) == (1, 1, 0)


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
    """Make every new packed copy 5% off its weight, so results show whether packed copies were used."""
    pack = weight_packing.pack_weight
    monkeypatch.setattr(weight_packing, "pack_weight", lambda weight: pack(weight * 1.05))


def test_masked_pass_with_packed_weights_stays_exact(pipe, embedding, cache, monkeypatch) -> None:
    """Pack from one row so the tiny model's projections are packed; a wrong packed copy must show."""
    monkeypatch.setattr(weight_packing, "MIN_PACKED_ROWS", 1)
    token_mask = rectangle_token_mask(3, 3)
    activations = cache["kv"]
    exact = identical_content_latents(pipe, activations, embedding, token_mask)

    wrong_packing(monkeypatch)
    forget_packed_copies()
    wrong = identical_content_latents(pipe, activations, embedding, token_mask)

    assert masked_relative_difference(exact, activations.latents[-1], token_mask) < TOLERANCE
    assert masked_relative_difference(wrong, activations.latents[-1], token_mask) > 100 * TOLERANCE
