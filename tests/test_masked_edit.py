"""Masked edits end to end on the locally built "test" demo model, and the cache's data structures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from editing.imaging import dilate
from workers.demo_model import build_flux_fill_demo
from workers.masked.activations import ActivationsMetadata, TemplateActivations
from workers.masked.conditioning import encode_prompt
from workers.masked.edit import decode_latents, mask_to_pil, run_cached_edit
from workers.masked.flops import TransformerShape, flop_speedup_limit, transformer_flops
from workers.masked.inference import denoise_masked, prepare_masked_inputs
from workers.masked.token_layout import TokenLayout
from workers.masked.warmup import warm_up_template

HEIGHT, WIDTH = 64, 96  # a 4 x 6 token grid
STEPS = 2
SEED = 3
GUIDANCE = 30.0
TEXT_TOKENS = 32
FEATHER_PX = 4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> FluxFillPipeline:
    model_dir = build_flux_fill_demo(tmp_path_factory.mktemp("model") / "test", preset="test")
    return FluxFillPipeline.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def template() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def activations(pipe: FluxFillPipeline, template: np.ndarray) -> TemplateActivations:
    return warm_up_template(
        pipe, template, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS
    )


def brush_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[20:37, 30:55] = True
    return mask


def test_warm_up_reports_each_step(pipe, template) -> None:
    reports: list[tuple[int, int]] = []
    warm_up_template(
        pipe,
        template,
        seed=SEED,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        max_sequence_length=TEXT_TOKENS,
        on_progress=lambda done, total: reports.append((done, total)),
    )

    assert reports == [(1, STEPS), (2, STEPS)]


def test_warm_up_records_every_step_and_block(pipe, activations) -> None:
    metadata = activations.metadata
    heads = pipe.transformer.config.num_attention_heads
    head_dim = pipe.transformer.config.attention_head_dim

    assert metadata.num_blocks == 2
    assert metadata.grid == (4, 6)
    assert activations.latents.shape == (STEPS + 1, 24, 64)
    assert len(activations.blocks) == STEPS
    assert all(len(step) == metadata.num_blocks for step in activations.blocks)
    assert activations.get(1, 1).k.shape == (heads, 24, head_dim)


def test_activations_round_trip_safetensors(activations, tmp_path: Path) -> None:
    path = tmp_path / "template.safetensors"
    save_file(activations.to_tensors(), path, metadata=activations.metadata.to_strings())
    with safe_open(path, framework="pt") as handle:
        metadata = ActivationsMetadata.from_strings(handle.metadata())
    restored = TemplateActivations.from_tensors(load_file(path), metadata)

    assert metadata == activations.metadata
    assert "s001.b01.v" in activations.to_tensors()
    assert torch.equal(restored.latents, activations.latents)
    assert torch.equal(restored.get(1, 1).k, activations.get(1, 1).k)
    assert torch.equal(restored.get(0, 0).v, activations.get(0, 0).v)
    assert restored.nbytes == activations.nbytes


def test_from_tensors_rejects_missing_block(activations) -> None:
    tensors = activations.to_tensors()
    del tensors["s001.b00.k"]

    with pytest.raises(ValueError, match="step 1, block 0"):
        TemplateActivations.from_tensors(tensors, activations.metadata)


def test_token_layout_is_conservative() -> None:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[17, 40] = True  # one pixel in token row 1, column 2

    layout = TokenLayout.from_pixel_mask(mask, patch=16, dilation=0)
    dilated = TokenLayout.from_pixel_mask(mask, patch=16, dilation=1)

    assert layout.masked.tolist() == [1 * 6 + 2]
    assert layout.num_masked + layout.unmasked.numel() == 24
    assert dilated.num_masked == 9


def test_request_with_other_seed_is_rejected(pipe, activations, template) -> None:
    image = Image.fromarray(template)
    embedding = encode_prompt(pipe, "", TEXT_TOKENS)
    layout = TokenLayout.from_pixel_mask(brush_mask())
    inputs = prepare_masked_inputs(
        pipe, image, mask_to_pil(brush_mask()), embedding, layout, seed=SEED + 1, steps=STEPS, guidance_scale=GUIDANCE
    )

    with pytest.raises(ValueError, match="seed"):
        denoise_masked(pipe, activations, inputs)


def test_prompt_path_matches_template_for_same_prompt(pipe, activations, template) -> None:
    image = Image.fromarray(template)
    embedding = encode_prompt(pipe, "", TEXT_TOKENS)
    layout = TokenLayout.from_pixel_mask(brush_mask())
    inputs = prepare_masked_inputs(
        pipe, image, Image.new("L", image.size, 0), embedding, layout, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE
    )
    latents = denoise_masked(pipe, activations, inputs)
    expected = activations.latents[-1]

    assert float((latents - expected).norm() / expected.norm()) < 1e-4


def test_decode_matches_stock_output(pipe, activations, template) -> None:
    stock = pipe(
        prompt="",
        image=Image.fromarray(template),
        mask_image=Image.new("L", (WIDTH, HEIGHT), 0),
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
        max_sequence_length=TEXT_TOKENS,
    ).images[0]

    decoded = decode_latents(pipe, activations.latents[-1], HEIGHT, WIDTH)

    assert np.array_equal(decoded, np.asarray(stock))


def test_composite_keeps_pixels_outside_feather(pipe, activations, template) -> None:
    mask = brush_mask()
    result = run_cached_edit(
        pipe,
        activations,
        template,
        mask,
        "a red apple on a wooden table",
        seed=SEED,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        max_sequence_length=TEXT_TOKENS,
        feather_px=FEATHER_PX,
    )
    outside = ~dilate(mask, FEATHER_PX)

    assert result.image.shape == template.shape
    assert np.array_equal(result.image[outside], template[outside])
    assert not np.array_equal(result.image[mask], template[mask])
    assert np.array_equal(result.image[mask], result.generated[mask])


def test_full_mask_saves_last_block_text_work(pipe) -> None:
    shape = TransformerShape.from_config(pipe.transformer.config)
    d, f, text = shape.hidden, shape.mlp_hidden, 128
    # The last block's text tokens skip their Q projection, MLP, output projection and attention queries.
    saved = 2 * text * d * d + 2 * text * d * f + 2 * text * (d + f) * d + 2 * 2 * text * (text + 1024) * d
    full = transformer_flops(shape, text, 1024)

    assert transformer_flops(shape, text, 1024, 1024) == pytest.approx(full - saved)
    assert flop_speedup_limit(shape, text, 1024, 100, full_prefix_blocks=shape.num_blocks) == pytest.approx(1.0)


def test_flop_limit_grows_as_mask_shrinks(pipe) -> None:
    shape = TransformerShape.from_config(pipe.transformer.config)
    limits = [flop_speedup_limit(shape, 128, 1024, masked) for masked in (512, 256, 64)]

    assert limits[0] > 1.0
    assert limits[0] < limits[1] < limits[2]
    assert transformer_flops(shape, 128, 1024, 64, variant="hidden") > transformer_flops(shape, 128, 1024, 64)
