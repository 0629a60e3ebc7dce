"""The SD3 family on its seeded "test" demo model (fp32): stock behaviour, masked exactness and wrong caches.

With a 16-channel transformer the stock inpaint pipeline puts the noised template latents back wherever the
latent mask is 0 after every step. So an unmasked warm-up ends exactly on the template's VAE latents whatever
the transformer predicts, and a request's final latents equal the template's outside its latent mask. So the
checks are on the transformer. With a cache recorded during the stock run of the request itself, masked
denoising reproduces the stock final latents. With the warm-up cache and the warm-up's own content (the
template trajectory), the masked transformer reproduces the stock prediction at every step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3InpaintPipeline
from PIL import Image
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from editing.imaging import token_mask
from workers.families.sd3 import (
    SD3Family,
    TextConditioning,
    attention_layers,
    decode_latents,
    denoise_masked,
    encode_text,
    masked_transformer,
    prepare_timesteps,
    record_activations,
)
from workers.masked.activations import BlockActivations, InMemoryBlockCacheSource, TemplateActivations
from workers.masked.edit import mask_to_pil
from workers.masked.processors import StepCursor
from workers.masked.token_layout import TokenLayout

SIZE = 96  # pixels; 16-pixel tokens give a 6 x 6 grid of 36 image tokens
GRID = SIZE // 16
STEPS = 3
SEED = 7
GUIDANCE = 5.0  # above 1, so the transformer runs an unconditional and a conditional half
TEXT_TOKENS = 16  # T5 tokens; PROMPT takes all 16
PROMPT = "a red apple on a wooden table"
WARMUP_PROMPT = ""
TOLERANCE = 1e-4

FAMILY = SD3Family()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd3") / "test"
    FAMILY.build_demo(folder, "test", seed=0)
    return folder


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> StableDiffusion3InpaintPipeline:
    return FAMILY.load(model_dir, dtype=torch.float32, device=torch.device("cpu"))


def template_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float64)
    base = np.stack([ramp[None, :].repeat(SIZE, 0), ramp[:, None].repeat(SIZE, 1), np.full((SIZE, SIZE), 96.0)], -1)
    noisy = base + rng.normal(0, 20, size=base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def warm(pipe: StableDiffusion3InpaintPipeline) -> TemplateActivations:
    return FAMILY.warm_up(
        pipe,
        template_image(0),
        seed=SEED,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        variant="kv",
        prompt=WARMUP_PROMPT,
        max_sequence_length=TEXT_TOKENS,
    )


def rectangle(top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def diagonal_stroke() -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return (np.abs(yy - 0.7 * xx - 10) < 6) & (xx > 20) & (xx < 80)


MASKS = {
    "small": (rectangle(37, 41, 9, 13), 0),
    "small-dilated": (rectangle(37, 41, 9, 13), 1),
    "large": (rectangle(8, 20, 60, 55), 0),
    "stroke": (diagonal_stroke(), 0),
}


def stock_latents(
    pipe: StableDiffusion3InpaintPipeline, image: np.ndarray, mask: np.ndarray, prompt: str
) -> torch.Tensor:
    return pipe(
        prompt=prompt,
        image=Image.fromarray(image),
        mask_image=mask_to_pil(mask),
        height=SIZE,
        width=SIZE,
        strength=1.0,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
        max_sequence_length=TEXT_TOKENS,
        output_type="latent",
    ).images[0]


def record_request(
    pipe: StableDiffusion3InpaintPipeline, image: np.ndarray, mask: np.ndarray, variant: str = "kv"
) -> TemplateActivations:
    """Activations of the stock run of the request itself: its unmasked K/V are exactly the full run's."""
    return record_activations(
        pipe,
        Image.fromarray(image),
        mask_to_pil(mask),
        PROMPT,
        seed=SEED,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        max_sequence_length=TEXT_TOKENS,
        variant=variant,
    )


def masked_latents(
    pipe: StableDiffusion3InpaintPipeline,
    activations: TemplateActivations,
    mask: np.ndarray,
    dilation: int,
    source: object | None = None,
) -> torch.Tensor:
    layout = TokenLayout.from_token_mask(token_mask(mask, patch=16, dilation=dilation))
    text = encode_text(pipe, PROMPT, GUIDANCE, TEXT_TOKENS)
    return denoise_masked(pipe, activations, mask_to_pil(mask), layout, text, block_source=source)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def token_elements(tokens: np.ndarray) -> torch.Tensor:
    """Bool (1, h, w) latent positions of the tokens in a (grid_h, grid_w) token mask; a token is 2x2 latents."""
    return torch.from_numpy(np.kron(tokens, np.ones((2, 2), dtype=bool)))[None]


def masked_part(latents: torch.Tensor, tokens: np.ndarray) -> torch.Tensor:
    return latents.masked_select(token_elements(tokens))


def test_build_demo_loads_with_from_pretrained(model_dir: Path, pipe, tmp_path: Path) -> None:
    FAMILY.build_demo(tmp_path / "again", "test", seed=0)
    first = load_file(model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    again = load_file(tmp_path / "again" / "transformer" / "diffusion_pytorch_model.safetensors")
    config = pipe.transformer.config
    text = encode_text(pipe, PROMPT, GUIDANCE, TEXT_TOKENS)

    assert isinstance(pipe, StableDiffusion3InpaintPipeline)
    assert (config.patch_size, config.in_channels, pipe.vae.config.latent_channels) == (2, 16, 16)
    assert pipe.text_encoder_3 is not None
    assert pipe.tokenizer_3 is not None
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert FAMILY.pixels_per_token(pipe) == FAMILY.working_multiple(pipe) == 16
    assert FAMILY.native_resolution(pipe) == config.sample_size * 8
    assert FAMILY.text_tokens(pipe, TEXT_TOKENS) == text.prompt_embeds.shape[1]


def test_blocks_are_far_from_identity(pipe) -> None:
    """Seeded re-initialization: each block changes the image tokens substantially, so wrong caches show."""
    transformer = pipe.transformer
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, GRID * GRID, transformer.inner_dim, generator=generator)
    text = torch.randn(1, 5, transformer.inner_dim, generator=generator)
    temb = torch.randn(1, transformer.inner_dim, generator=generator)
    with torch.inference_mode():
        for block in transformer.transformer_blocks:
            _text_out, hidden_out = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
            assert relative_difference(hidden_out, hidden) > 0.3


def test_warm_up_equals_stock_run(pipe, warm) -> None:
    image = template_image(0)
    stock = stock_latents(pipe, image, np.zeros((SIZE, SIZE), dtype=bool), WARMUP_PROMPT)
    init_image = pipe.image_processor.preprocess(Image.fromarray(image), height=SIZE, width=SIZE)
    encoded = pipe._encode_vae_image(init_image, generator=torch.Generator().manual_seed(SEED))
    first_key = warm.get(0, 0).k
    request_key = record_request(pipe, image, MASKS["small"][0]).get(0, 0).k
    heads = pipe.transformer.config.num_attention_heads

    assert torch.equal(warm.latents[-1], stock)
    # The empty-mask blend replaces every latent by the template's, so the warm-up ends on its VAE latents.
    assert torch.equal(warm.latents[-1], encoded[0])
    assert warm.latents.shape == (STEPS + 1, 16, SIZE // 8, SIZE // 8)
    assert warm.metadata.num_blocks == len(attention_layers(pipe.transformer)) == len(warm.blocks[0])
    # Both guidance halves are kept, unconditional heads first. The negative prompt is also empty, so the
    # warm-up's halves are equal; a request's prompt makes them differ.
    assert first_key.shape == (2 * heads, GRID * GRID, pipe.transformer.config.attention_head_dim)
    assert torch.equal(first_key[:heads], first_key[heads:])
    assert not torch.allclose(request_key[:heads], request_key[heads:])


@pytest.mark.parametrize("variant", ["kv", "hidden"])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_masked_matches_stock_with_request_cache(pipe, name, variant) -> None:
    mask, dilation = MASKS[name]
    image = template_image(0)
    expected = stock_latents(pipe, image, mask, PROMPT)
    latents = masked_latents(pipe, record_request(pipe, image, mask, variant), mask, dilation)
    tokens = token_mask(mask, patch=16, dilation=dilation)

    assert relative_difference(masked_part(latents, tokens), masked_part(expected, tokens)) < TOLERANCE
    assert relative_difference(latents, expected) < TOLERANCE


def test_masked_transformer_on_template_trajectory(pipe, warm) -> None:
    """Identical content: masked tokens on the warm-up trajectory get the stock prediction at every step."""
    tokens = token_mask(MASKS["stroke"][0], patch=16, dilation=0)
    layout = TokenLayout.from_token_mask(tokens)
    text = encode_text(pipe, WARMUP_PROMPT, GUIDANCE, TEXT_TOKENS)
    timesteps = prepare_timesteps(pipe, SIZE, SIZE, STEPS)
    cursor = StepCursor()
    with torch.inference_mode():
        stock = [predict(pipe, warm.latents[step], text, t) for step, t in enumerate(timesteps)]
        with masked_transformer(pipe.transformer, InMemoryBlockCacheSource(warm), layout, cursor):
            for step, t in enumerate(timesteps):
                cursor.step = step
                masked = predict(pipe, warm.latents[step], text, t)
                expected = torch.stack([masked_part(half, tokens) for half in stock[step]])
                assert relative_difference(torch.stack([masked_part(h, tokens) for h in masked]), expected) < TOLERANCE


def predict(pipe, latents: torch.Tensor, text: TextConditioning, t: torch.Tensor) -> torch.Tensor:
    return pipe.transformer(
        hidden_states=latents.expand(text.batch, -1, -1, -1),
        timestep=t.expand(text.batch),
        encoder_hidden_states=text.prompt_embeds,
        pooled_projections=text.pooled_prompt_embeds,
        return_dict=False,
    )[0]


def test_empty_latent_mask_keeps_warm_up(pipe, warm) -> None:
    """Mask pixels off the 8-pixel latent sampling grid touch tokens but leave the stock latent mask empty."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[41, 45] = mask[70, 21] = True
    output = FAMILY.masked_edit(
        pipe, warm, template_image(0), mask, WARMUP_PROMPT,
        seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS, dilation=1,
    )

    assert torch.equal(stock_latents(pipe, template_image(0), mask, WARMUP_PROMPT), warm.latents[-1])
    assert torch.equal(output.latents, warm.latents[-1])


class ShiftedStepSource:
    """Serves the next step's activations, a deliberately wrong cache."""

    def __init__(self, activations: TemplateActivations) -> None:
        self._activations = activations

    def get(self, step: int, block: int) -> BlockActivations:
        return self._activations.get(min(step + 1, self._activations.metadata.num_steps - 1), block)


class ShiftedLayerSource:
    """Serves the previous attention layer's activations (layer 1 for layer 0), a deliberately wrong cache."""

    def __init__(self, activations: TemplateActivations) -> None:
        self._activations = activations

    def get(self, step: int, block: int) -> BlockActivations:
        return self._activations.get(step, block - 1 if block > 0 else 1)


@pytest.mark.parametrize("variant", ["kv", "hidden"])
@pytest.mark.parametrize("wrong_source", [ShiftedStepSource, ShiftedLayerSource])
def test_shifted_cache_breaks_exactness(pipe, wrong_source, variant) -> None:
    mask, dilation = MASKS["large"]
    image = template_image(0)
    cache = record_request(pipe, image, mask, variant)
    expected = stock_latents(pipe, image, mask, PROMPT)
    latents = masked_latents(pipe, cache, mask, dilation, source=wrong_source(cache))
    tokens = token_mask(mask, patch=16, dilation=dilation)

    assert relative_difference(masked_part(latents, tokens), masked_part(expected, tokens)) > 100 * TOLERANCE


def test_cache_of_other_template_breaks_exactness(pipe) -> None:
    """Every template starts from the same seeded noise, so step 0 K/V agree and the break is smaller."""
    mask, dilation = MASKS["small"]
    image = template_image(0)
    right = record_request(pipe, image, mask)
    other = record_request(pipe, 255 - template_image(1), mask)
    # The other template's K/V with this template's latent trajectory: only the cached layers are wrong.
    wrong = TemplateActivations(metadata=right.metadata, latents=right.latents, blocks=other.blocks)
    expected = stock_latents(pipe, image, mask, PROMPT)
    latents = masked_latents(pipe, wrong, mask, dilation)
    tokens = token_mask(mask, patch=16, dilation=dilation)

    assert relative_difference(masked_part(latents, tokens), masked_part(expected, tokens)) > 30 * TOLERANCE


def test_hidden_variant_halves_cache(pipe, warm) -> None:
    hidden = FAMILY.warm_up(
        pipe, template_image(0), seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, variant="hidden",
        prompt=WARMUP_PROMPT, max_sequence_length=TEXT_TOKENS,
    )
    mask, dilation = MASKS["small-dilated"]
    settings = dict(seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS, dilation=dilation)
    from_kv = FAMILY.masked_edit(pipe, warm, template_image(0), mask, PROMPT, **settings)
    from_hidden = FAMILY.masked_edit(pipe, hidden, template_image(0), mask, PROMPT, **settings)
    block_bytes = [sum(entry.nbytes for row in cache.blocks for entry in row) for cache in (warm, hidden)]

    assert hidden.metadata.variant == "hidden"
    assert all(entry.k is None and entry.hidden is not None for row in hidden.blocks for entry in row)
    assert block_bytes[1] * 2 == block_bytes[0]
    assert torch.equal(hidden.latents, warm.latents)
    assert relative_difference(from_hidden.latents, from_kv.latents) < TOLERANCE


def test_stock_and_masked_edit_outputs(pipe, warm) -> None:
    mask, dilation = MASKS["small-dilated"]
    image = template_image(0)
    stock_steps: list[tuple[int, int]] = []
    masked_steps: list[tuple[int, int]] = []
    settings = dict(seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS)
    stock = FAMILY.stock_edit(
        pipe, Image.fromarray(image), mask_to_pil(mask), PROMPT, on_step=lambda *a: stock_steps.append(a), **settings
    )
    output = FAMILY.masked_edit(
        pipe, warm, image, mask, PROMPT, dilation=dilation, on_step=lambda *a: masked_steps.append(a), **settings
    )
    expected_steps = [(step, STEPS) for step in range(1, STEPS + 1)]

    assert stock.shape == output.generated.shape == (SIZE, SIZE, 3)
    assert stock.dtype == output.generated.dtype == np.uint8
    assert stock_steps == masked_steps == expected_steps
    assert output.latents.shape == warm.latents[-1].shape
    assert np.array_equal(decode_latents(pipe, stock_latents(pipe, image, mask, PROMPT)), stock)
    assert np.array_equal(decode_latents(pipe, output.latents), output.generated)


def test_masked_edit_rejects_other_settings(pipe, warm) -> None:
    mask, dilation = MASKS["small"]
    with pytest.raises(ValueError, match="seed"):
        FAMILY.masked_edit(
            pipe, warm, template_image(0), mask, PROMPT,
            seed=SEED + 1, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS, dilation=dilation,
        )


class ConstantSource:
    """Serves the same K/V for every step and layer; FLOP counts do not depend on the values."""

    def __init__(self, entry: BlockActivations) -> None:
        self._entry = entry

    def get(self, step: int, block: int) -> BlockActivations:
        return self._entry


def counted_flops(pipe, text: TextConditioning, layout: TokenLayout | None, variant: str = "kv") -> int:
    """FLOPs torch counts for one transformer pass; the math attention kernel makes attention countable."""
    transformer = pipe.transformer
    latents = torch.zeros(1, 16, SIZE // 8, SIZE // 8)
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    if variant == "hidden":
        entry = BlockActivations(hidden=torch.zeros(text.batch, GRID * GRID, heads * head_dim))
    else:
        shape = (heads * text.batch, GRID * GRID, head_dim)
        entry = BlockActivations(k=torch.zeros(shape), v=torch.zeros(shape))
    source = ConstantSource(entry)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if layout is None:
            predict(pipe, latents[0], text, torch.tensor(500.0))
        else:
            with masked_transformer(transformer, source, layout, StepCursor(), variant):
                predict(pipe, latents[0], text, torch.tensor(500.0))
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", ["kv", "hidden"])
def test_flop_fraction_matches_counted_flops(pipe, variant) -> None:
    text = encode_text(pipe, PROMPT, GUIDANCE, TEXT_TOKENS)
    text_tokens = FAMILY.text_tokens(pipe, TEXT_TOKENS)
    full = np.ones((GRID, GRID), dtype=bool)
    shrinking = [full, full.copy(), np.zeros_like(full), np.zeros_like(full)]
    shrinking[1][0] = False
    shrinking[2][1:4, 1:5] = True
    shrinking[3][2, 3] = True
    fractions = [
        FAMILY.flop_fraction(pipe, height=SIZE, width=SIZE, token_mask=m, text_tokens=text_tokens, variant=variant)
        for m in shrinking
    ]
    counted_full = counted_flops(pipe, text, None)
    counted_masked = counted_flops(pipe, text, TokenLayout.from_token_mask(shrinking[2]), variant)

    assert fractions[0] == 1.0
    assert all(a > b for a, b in zip(fractions, fractions[1:]))
    assert fractions[2] == pytest.approx(counted_masked / counted_full, rel=1e-9)


def test_runs_restore_processors_and_hooks(pipe, warm) -> None:
    transformer = pipe.transformer
    before = dict(transformer.attn_processors)
    mask, dilation = MASKS["small"]

    def stop(done: int, _total: int) -> None:
        if done == 2:
            raise RuntimeError("stopped")

    FAMILY.masked_edit(
        pipe, warm, template_image(0), mask, PROMPT,
        seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS, dilation=dilation,
    )
    with pytest.raises(RuntimeError, match="stopped"):
        FAMILY.masked_edit(
            pipe, warm, template_image(0), mask, PROMPT,
            seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS, dilation=dilation,
            on_step=stop,
        )
    after = transformer.attn_processors
    hooked = [transformer, transformer.pos_embed, transformer.proj_out]

    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert all(not module._forward_hooks for module in hooked)
    assert all(not module._forward_pre_hooks for module in hooked)
