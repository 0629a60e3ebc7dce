"""Masked SDXL and SD 2 inpainting against the stock pipelines on tiny re-initialized demo models (fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editing.imaging import token_mask
from workers.families.base import ModelFamily
from workers.families.unet import SD2Family, SDXLFamily, UNetBlocks, masked_run, record_run
from workers.masked.activations import TemplateActivations
from workers.masked.edit import mask_to_pil

HEIGHT, WIDTH = 64, 96  # an 8 x 12 latent grid, pooled to 4 x 6 and 2 x 3 inside the UNet
STEPS = 3
SEED = 5
GUIDANCE = 6.0
PROMPT = "a red apple on a wooden table"
TOLERANCE = 1e-4
# A wrong cache must miss by far more than rounding: 100 times the tolerance.
WRONG_CACHE_MIN = 100 * TOLERANCE
# Pixel rectangles (top, left, height, width); with one token of dilation they mark 9, 30 and 70 of 96 tokens.
RECTANGLES = {"small": (24, 40, 8, 8), "medium": (16, 32, 24, 32), "large": (8, 16, 40, 64)}

FAMILIES = [SD2Family(), SDXLFamily()]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda family: family.name)
def family(request: pytest.FixtureRequest) -> ModelFamily:
    return request.param


@pytest.fixture(scope="module")
def demo_folder(family: ModelFamily, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(family.name) / "test"
    family.build_demo(folder, "test", seed=0)
    return folder


@pytest.fixture(scope="module")
def pipe(family: ModelFamily, demo_folder: Path):
    return family.load(demo_folder, dtype=torch.float32, device=torch.device("cpu"))


def template(seed: int) -> Image.Image:
    """Smooth gradients with noise, so the VAE latents carry structure; each seed orders the channels anew."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 255, HEIGHT)[:, None].repeat(WIDTH, 1)
    cols = np.linspace(255, 0, WIDTH)[None, :].repeat(HEIGHT, 0)
    base = np.stack([rows, cols, np.full((HEIGHT, WIDTH), 120.0)], axis=-1)[..., rng.permutation(3)]
    noisy = base + rng.normal(0, 25, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def pixel_mask(name: str) -> np.ndarray:
    top, left, height, width = RECTANGLES[name]
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def latent_mask(mask: np.ndarray) -> np.ndarray:
    return token_mask(mask, patch=8, dilation=1)


def record(pipe, image: Image.Image, mask: np.ndarray) -> TemplateActivations:
    return record_run(
        pipe,
        image,
        mask_to_pil(mask),
        PROMPT,
        seed=SEED,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        max_sequence_length=77,
    )


def warm_up(family: ModelFamily, pipe, image: np.ndarray, prompt: str) -> TemplateActivations:
    return family.warm_up(
        pipe,
        image,
        seed=SEED,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        variant="kv",
        prompt=prompt,
        max_sequence_length=77,
    )


def run_masked(pipe, activations: TemplateActivations, condition: np.ndarray, recompute: np.ndarray) -> torch.Tensor:
    output = masked_run(
        pipe,
        activations,
        template(0),
        mask_to_pil(condition),
        recompute,
        PROMPT,
        seed=SEED,
        steps=STEPS,
        guidance_scale=GUIDANCE,
    )
    return output.latents


def masked_relative_difference(actual: torch.Tensor, expected: torch.Tensor, recompute: np.ndarray) -> float:
    """Relative L2 difference of (4, h, w) latents over the recomputed latent positions."""
    selected = torch.as_tensor(recompute)
    difference = actual[:, selected] - expected[:, selected]
    return float(torch.linalg.vector_norm(difference) / torch.linalg.vector_norm(expected[:, selected]))


@pytest.fixture(scope="module")
def request_cache(pipe) -> TemplateActivations:
    """Activations of the stock run of the medium-mask request itself."""
    return record(pipe, template(0), pixel_mask("medium"))


def stock_latents(pipe, mask: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        output = pipe(
            prompt=PROMPT,
            image=template(0),
            mask_image=mask_to_pil(mask),
            height=HEIGHT,
            width=WIDTH,
            strength=1.0,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator(device="cpu").manual_seed(SEED),
            output_type="latent",
        )
    return output.images[0]


def test_demo_loads_with_from_pretrained(family: ModelFamily, pipe, tmp_path: Path) -> None:
    assert isinstance(pipe, family.pipeline_class)
    assert pipe.unet.config.in_channels == 9
    assert family.pixels_per_token(pipe) == 8
    assert family.text_tokens(pipe, 512) == 77
    assert HEIGHT % family.working_multiple(pipe) == 0
    assert WIDTH % family.working_multiple(pipe) == 0

    family.build_demo(tmp_path, "test", seed=0)
    rebuilt = family.load(tmp_path, dtype=torch.float32, device=torch.device("cpu"))
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, rebuilt.unet.state_dict()[name]), name


def test_stock_edit_reports_steps(family: ModelFamily, pipe) -> None:
    reported: list[tuple[int, int]] = []
    mask = mask_to_pil(pixel_mask("medium"))
    image = family.stock_edit(
        pipe, template(0), mask, PROMPT, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=77,
        on_step=lambda done, total: reported.append((done, total)),
    )
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert image.dtype == np.uint8
    assert reported == [(step, STEPS) for step in range(1, STEPS + 1)]


def test_recording_run_equals_stock_run(pipe, request_cache: TemplateActivations) -> None:
    assert torch.equal(request_cache.latents[-1], stock_latents(pipe, pixel_mask("medium")))
    assert request_cache.latents.shape == (STEPS + 1, 4, HEIGHT // 8, WIDTH // 8)
    assert request_cache.metadata.num_blocks == len(UNetBlocks.of(pipe.unet).blocks)


@pytest.mark.parametrize("size", sorted(RECTANGLES))
def test_request_cache_reproduces_stock_latents(pipe, size: str) -> None:
    mask = pixel_mask(size)
    activations = record(pipe, template(0), mask)
    recompute = latent_mask(mask)
    latents = run_masked(pipe, activations, mask, recompute)
    expected = stock_latents(pipe, mask)
    assert masked_relative_difference(latents, expected, recompute) <= TOLERANCE
    # Unmasked latents are the cached trajectory's, which is the stock run's here.
    assert torch.equal(latents[:, ~torch.as_tensor(recompute)], expected[:, ~torch.as_tensor(recompute)])


def test_identical_content_reproduces_warm_up(family: ModelFamily, pipe) -> None:
    image = np.asarray(template(0))
    warm = warm_up(family, pipe, image, PROMPT)
    recompute = latent_mask(pixel_mask("medium"))
    empty = np.zeros((HEIGHT, WIDTH), dtype=bool)
    latents = run_masked(pipe, warm, empty, recompute)
    assert masked_relative_difference(latents, warm.latents[-1], recompute) <= TOLERANCE


def test_cache_keeps_only_group_outputs(family: ModelFamily, pipe, request_cache: TemplateActivations) -> None:
    blocks = UNetBlocks.of(pipe.unet)
    outputs = blocks.group_outputs()
    for row in request_cache.blocks:
        assert {index for index, entry in enumerate(row) if entry.hidden is not None} == outputs
        assert all(entry.k is not None and entry.v is not None for entry in row)
    groups_with_several_blocks = [group for group in blocks.groups if len(group.transformer_blocks) > 1]
    # The SDXL test preset has two blocks per Transformer2DModel at its deepest level; SD 2 has one everywhere.
    hidden_outputs_dropped = sum(len(group.transformer_blocks) - 1 for group in groups_with_several_blocks)
    assert len(outputs) == len(blocks.blocks) - hidden_outputs_dropped
    assert (len(outputs) < len(blocks.blocks)) == (family.name == "sdxl")


def shifted_step(activations: TemplateActivations) -> TemplateActivations:
    blocks = [activations.blocks[(step + 1) % STEPS] for step in range(STEPS)]
    return TemplateActivations(activations.metadata, activations.latents, blocks)


def shifted_block(activations: TemplateActivations) -> TemplateActivations:
    """Give every block the cache of the next block with the same K/V and hidden shapes (or no hidden)."""
    row = activations.blocks[0]
    shapes = [(entry.k.shape, None if entry.hidden is None else entry.hidden.shape) for entry in row]
    targets = []
    for index, shape in enumerate(shapes):
        same = [other for other in range(len(row)) if shapes[other] == shape]
        targets.append(same[(same.index(index) + 1) % len(same)])
    assert any(target != index for index, target in enumerate(targets))
    blocks = [[step_blocks[target] for target in targets] for step_blocks in activations.blocks]
    return TemplateActivations(activations.metadata, activations.latents, blocks)


@pytest.mark.parametrize("kind", ["step", "block", "template"])
def test_wrong_cache_breaks_tolerance(pipe, request_cache: TemplateActivations, kind: str) -> None:
    mask = pixel_mask("medium")
    if kind == "step":
        wrong = shifted_step(request_cache)
    elif kind == "block":
        wrong = shifted_block(request_cache)
    else:
        wrong = record(pipe, template(1), mask)
    recompute = latent_mask(mask)
    latents = run_masked(pipe, wrong, mask, recompute)
    assert masked_relative_difference(latents, request_cache.latents[-1], recompute) > WRONG_CACHE_MIN


def test_masked_edit_keeps_template_latents(family: ModelFamily, pipe) -> None:
    image = np.asarray(template(0))
    warm = warm_up(family, pipe, image, "")
    mask = pixel_mask("small")
    reported: list[int] = []
    output = family.masked_edit(
        pipe, warm, image, mask, PROMPT, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=77,
        dilation=1, on_step=lambda done, _total: reported.append(done),
    )
    assert output.generated.shape == (HEIGHT, WIDTH, 3)
    assert output.generated.dtype == np.uint8
    assert reported == list(range(1, STEPS + 1))
    unmasked = ~torch.as_tensor(latent_mask(mask))
    assert torch.equal(output.latents[:, unmasked], warm.latents[-1][:, unmasked])
    assert not torch.allclose(output.latents[:, ~unmasked], warm.latents[-1][:, ~unmasked])
    with pytest.raises(ValueError, match="seed"):
        family.masked_edit(
            pipe, warm, image, mask, PROMPT, seed=SEED + 1, steps=STEPS, guidance_scale=GUIDANCE,
            max_sequence_length=77, dilation=1,
        )


def test_flop_fraction_shrinks_with_mask(family: ModelFamily, pipe) -> None:
    def fraction(mask: np.ndarray) -> float:
        return family.flop_fraction(
            pipe, height=HEIGHT, width=WIDTH, token_mask=mask, text_tokens=77, variant="kv"
        )

    full = np.ones((HEIGHT // 8, WIDTH // 8), dtype=bool)
    assert fraction(full) == pytest.approx(1.0, abs=1e-12)
    # Nested latent masks that stay partial at the coarser UNet levels too: half, a 4 x 4 corner, one token.
    shrinking = []
    for rows, cols in ((8, 6), (4, 4), (1, 1)):
        mask = np.zeros_like(full)
        mask[:rows, :cols] = True
        shrinking.append(fraction(mask))
    assert 1.0 > shrinking[0] > shrinking[1] > shrinking[2] > 0.0


def test_processors_and_hooks_restored(family: ModelFamily, pipe, request_cache: TemplateActivations) -> None:
    unet = pipe.unet
    before = unet.attn_processors

    def no_hooks() -> bool:
        return all(not module._forward_hooks and not module._forward_pre_hooks for module in unet.modules())

    mask = pixel_mask("medium")
    run_masked(pipe, request_cache, mask, latent_mask(mask))
    assert unet.attn_processors == before
    assert no_hooks()

    def stop(_done: int, _total: int) -> None:
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        masked_run(
            pipe, request_cache, template(0), mask_to_pil(mask), latent_mask(mask), PROMPT,
            seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, on_step=stop,
        )
    assert unet.attn_processors == before
    assert no_hooks()
