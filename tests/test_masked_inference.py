"""Masked Flux Fill inference against the stock full computation on a tiny re-initialized model (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
from PIL import Image

from workers.masked.activations import BlockActivations, BlockCacheSource, TemplateActivations
from workers.masked.conditioning import PromptEmbedding, embedding_from_tensors
from workers.masked import inference
from workers.masked.inference import denoise_masked, prepare_masked_inputs
from workers.masked.token_layout import TokenLayout
from workers.masked.warmup import warm_up_template

SIZE = 96  # pixels; 16-pixel tokens give a 6 x 6 grid of 36 image tokens
GRID = SIZE // 16
STEPS = 3
SEED = 7
GUIDANCE = 30.0
TEXT_TOKENS = 8
TOLERANCE = 1e-4


def build_tiny_pipeline() -> FluxFillPipeline:
    """Build a Flux Fill pipeline with 2 double and 2 single blocks and seeded random weights, no text encoders."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=384,
        out_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    reinitialize_linear_layers(transformer, generator=torch.Generator().manual_seed(1))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, use_dynamic_shifting=True
    )
    return FluxFillPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def reinitialize_linear_layers(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Draw every Linear weight from N(0, 1/fan_in) and bias from N(0, 0.1^2) so each layer changes its input.

    The default init keeps AdaLN gates and attention outputs small, which would let a wrong cache pass unnoticed.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in**0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def random_embedding(pipe: FluxFillPipeline, seed: int) -> PromptEmbedding:
    generator = torch.Generator().manual_seed(seed)
    prompt_embeds = torch.randn(1, TEXT_TOKENS, 32, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    return embedding_from_tensors(pipe, prompt_embeds, pooled)


def template_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float64)
    base = np.stack([ramp[None, :].repeat(SIZE, 0), ramp[:, None].repeat(SIZE, 1), np.full((SIZE, SIZE), 96.0)], -1)
    noisy = base + rng.normal(0, 20, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def rectangle_token_mask(num_masked_rows: int, num_masked_cols: int) -> np.ndarray:
    mask = np.zeros((GRID, GRID), dtype=bool)
    mask[1 : 1 + num_masked_rows, 2 : 2 + num_masked_cols] = True
    return mask


def pixel_mask(token_mask: np.ndarray) -> Image.Image:
    pixels = np.kron(token_mask.astype(np.uint8), np.ones((16, 16), dtype=np.uint8)) * 255
    return Image.fromarray(pixels, mode="L")


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def masked_relative_difference(actual: torch.Tensor, expected: torch.Tensor, token_mask: np.ndarray) -> float:
    """Relative L2 difference over the recomputed tokens of packed latents (N_img, 64)."""
    masked = TokenLayout.from_token_mask(token_mask).masked
    return relative_difference(actual[masked], expected[masked])


@pytest.fixture(scope="module")
def pipe() -> FluxFillPipeline:
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def embedding(pipe: FluxFillPipeline) -> PromptEmbedding:
    return random_embedding(pipe, seed=11)


@pytest.fixture(scope="module")
def cache(pipe: FluxFillPipeline, embedding: PromptEmbedding) -> dict[str, TemplateActivations]:
    return {
        variant: warm_up_template(
            pipe, template_image(0), seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, variant=variant, prompt=embedding
        )
        for variant in ("kv", "hidden")
    }


def identical_content_latents(
    pipe: FluxFillPipeline,
    activations: TemplateActivations,
    embedding: PromptEmbedding,
    token_mask: np.ndarray,
    full_prefix_blocks: int = 0,
    block_source: BlockCacheSource | None = None,
) -> torch.Tensor:
    """Recompute the tokens of `token_mask` with the warm-up's conditioning, so the exact result is the template's."""
    image = template_image(0)
    inputs = prepare_masked_inputs(
        pipe,
        image,
        Image.new("L", image.size, 0),
        embedding,
        TokenLayout.from_token_mask(token_mask),
        seed=SEED,
        steps=STEPS,
        guidance_scale=GUIDANCE,
    )
    return denoise_masked(
        pipe, activations, inputs, full_prefix_blocks=full_prefix_blocks, block_source=block_source
    )


MASK_SHAPES = [(1, 1), (2, 2), (3, 3), (5, 4)]  # token ratios 1/36, 4/36, 9/36, 20/36


@pytest.mark.parametrize("variant", ["kv", "hidden"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES)
def test_masked_matches_full_for_identical_content(pipe, embedding, cache, variant, mask_shape) -> None:
    activations = cache[variant]
    token_mask = rectangle_token_mask(*mask_shape)
    latents = identical_content_latents(pipe, activations, embedding, token_mask)

    assert masked_relative_difference(latents, activations.latents[-1], token_mask) < TOLERANCE
    assert relative_difference(latents, activations.latents[-1]) < TOLERANCE


@pytest.mark.parametrize("variant", ["kv", "hidden"])
@pytest.mark.parametrize("full_prefix_blocks", [1, 4])
def test_full_prefix_blocks_match_full(pipe, embedding, cache, variant, full_prefix_blocks) -> None:
    activations = cache[variant]
    token_mask = rectangle_token_mask(2, 3)
    latents = identical_content_latents(
        pipe, activations, embedding, token_mask, full_prefix_blocks=full_prefix_blocks
    )

    assert masked_relative_difference(latents, activations.latents[-1], token_mask) < TOLERANCE
    assert relative_difference(latents, activations.latents[-1]) < TOLERANCE


def test_warm_up_matches_stock_pipeline(pipe, embedding, cache) -> None:
    image = template_image(0)
    stock = pipe(
        prompt_embeds=embedding.prompt_embeds,
        pooled_prompt_embeds=embedding.pooled_prompt_embeds,
        image=image,
        mask_image=Image.new("L", image.size, 0),
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).images[0]

    assert torch.equal(cache["kv"].latents[-1], stock)


class ShiftedStepSource:
    """Cache source that serves the activations of the next step, a deliberately wrong cache."""

    def __init__(self, activations: TemplateActivations) -> None:
        self._activations = activations

    def get(self, step: int, block: int) -> BlockActivations:
        return self._activations.get(min(step + 1, self._activations.metadata.num_steps - 1), block)


class ShiftedBlockSource:
    """Cache source that serves the activations of the previous block, a deliberately wrong cache."""

    def __init__(self, activations: TemplateActivations) -> None:
        self._activations = activations

    def get(self, step: int, block: int) -> BlockActivations:
        return self._activations.get(step, max(block - 1, 0) if block > 0 else 1)


@pytest.mark.parametrize("variant", ["kv", "hidden"])
@pytest.mark.parametrize("wrong_source", [ShiftedStepSource, ShiftedBlockSource])
def test_wrong_cache_breaks_exactness(pipe, embedding, cache, variant, wrong_source) -> None:
    activations = cache[variant]
    token_mask = rectangle_token_mask(2, 2)
    latents = identical_content_latents(
        pipe, activations, embedding, token_mask, block_source=wrong_source(activations)
    )

    assert masked_relative_difference(latents, activations.latents[-1], token_mask) > 100 * TOLERANCE


def test_cache_of_other_template_breaks_exactness(pipe, embedding, cache) -> None:
    other = warm_up_template(
        pipe, template_image(1), seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, variant="kv", prompt=embedding
    )
    expected = cache["kv"].latents[-1]
    # The other template's K/V with this template's latent trajectory: only the cached blocks are wrong.
    wrong = TemplateActivations(metadata=other.metadata, latents=cache["kv"].latents, blocks=other.blocks)
    token_mask = rectangle_token_mask(2, 2)
    latents = identical_content_latents(pipe, wrong, embedding, token_mask)

    assert masked_relative_difference(latents, expected, token_mask) > 100 * TOLERANCE


@pytest.mark.parametrize("variant", ["kv", "hidden"])
def test_changed_content_differs_from_full(pipe, embedding, cache, variant) -> None:
    """Non-degenerate weights: with a new prompt the cached context is stale, so the results differ measurably."""
    activations = cache[variant]
    image = template_image(0)
    token_mask = rectangle_token_mask(3, 3)
    mask = pixel_mask(token_mask)
    new_embedding = random_embedding(pipe, seed=99)
    full = pipe(
        prompt_embeds=new_embedding.prompt_embeds,
        pooled_prompt_embeds=new_embedding.pooled_prompt_embeds,
        image=image,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).images[0]
    layout = TokenLayout.from_token_mask(token_mask)
    inputs = prepare_masked_inputs(
        pipe, image, mask, new_embedding, layout, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE
    )
    latents = denoise_masked(pipe, activations, inputs)
    masked = layout.masked

    assert relative_difference(full[masked], activations.latents[-1][masked]) > 0.05
    assert relative_difference(latents[masked], full[masked]) > 100 * TOLERANCE
    assert relative_difference(latents[masked], full[masked]) < 1.0


@pytest.mark.parametrize("full_prefix_blocks", [0, 1])
def test_masked_run_restores_processors_and_hooks(pipe, embedding, cache, full_prefix_blocks) -> None:
    before = dict(pipe.transformer.attn_processors)
    identical_content_latents(
        pipe, cache["kv"], embedding, rectangle_token_mask(2, 2), full_prefix_blocks=full_prefix_blocks
    )
    after = pipe.transformer.attn_processors
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]

    assert all(after[name] is processor for name, processor in before.items())
    assert all(not block._forward_pre_hooks for block in blocks)
    assert not pipe.transformer._forward_pre_hooks


@pytest.mark.parametrize("full_prefix_blocks", [0, 1])
def test_last_block_runs_on_masked_image_tokens_only(pipe, embedding, cache, full_prefix_blocks) -> None:
    """The text tokens' outputs of the last block are dropped, so its MLP receives the masked image tokens alone."""
    rows: list[int] = []
    last = pipe.transformer.single_transformer_blocks[-1]
    hook = last.proj_mlp.register_forward_hook(lambda _module, args, _output: rows.append(args[0].shape[1]))
    token_mask = rectangle_token_mask(2, 3)
    try:
        latents = identical_content_latents(
            pipe, cache["kv"], embedding, token_mask, full_prefix_blocks=full_prefix_blocks
        )
    finally:
        hook.remove()

    assert rows == [int(token_mask.sum())] * STEPS
    assert masked_relative_difference(latents, cache["kv"].latents[-1], token_mask) < TOLERANCE


def test_masked_run_restores_step_level_modules(pipe, embedding, cache) -> None:
    transformer = pipe.transformer
    before = dict(transformer.named_modules())
    identical_content_latents(pipe, cache["kv"], embedding, rectangle_token_mask(2, 2))

    assert dict(transformer.named_modules()) == before


@pytest.mark.parametrize("variant", ["kv", "hidden"])
def test_step_tables_serve_the_current_step(pipe, embedding, cache, variant, monkeypatch) -> None:
    """Tables built from the timesteps in reverse order give another result: the loop reads the tables."""
    activations = cache[variant]
    token_mask = rectangle_token_mask(2, 2)
    exact = identical_content_latents(pipe, activations, embedding, token_mask)
    build_tables = inference.step_tables

    def reversed_tables(transformer, cursor, timesteps, *args):
        return build_tables(transformer, cursor, timesteps.flip(0), *args)

    monkeypatch.setattr(inference, "step_tables", reversed_tables)
    wrong = identical_content_latents(pipe, activations, embedding, token_mask)

    assert masked_relative_difference(exact, activations.latents[-1], token_mask) < TOLERANCE
    assert masked_relative_difference(wrong, activations.latents[-1], token_mask) > 100 * TOLERANCE
