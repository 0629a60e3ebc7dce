"""Build small, randomly initialised Flux Fill pipelines locally, without any download.

The saved folder has the same layout as a hub checkpoint such as black-forest-labs/FLUX.1-Fill-dev, so
`FluxFillPipeline.from_pretrained(path)` loads it unchanged. The weights are random but seeded, so every
build with the same preset and seed produces the same model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Regex
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

logger = logging.getLogger(__name__)

# Flux packs 2x2 latent patches into one token, so 16 latent channels become 64 token channels.
LATENT_CHANNELS = 16
PACKED_LATENT_CHANNELS = LATENT_CHANNELS * 4
# Fill input per token: noisy latent (64) + masked-image latent (64) + mask (8 * 8 pixels * 2 * 2 patch = 256).
FILL_IN_CHANNELS = PACKED_LATENT_CHANNELS + PACKED_LATENT_CHANNELS + 256

# FLUX.1 VAE factors as listed in diffusers 0.42 `utils/remote_utils.py`, and the shift defaults of
# `calculate_shift` in diffusers' Flux pipelines. The shift 3.0 is an estimate, because dynamic shifting overrides it.
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159
FLUX_SCHEDULER_CONFIG: dict[str, float | int | bool] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# Both tokenizers are shared by all presets. The corpus is small, so training stops below this size.
TOKENIZER_VOCAB_SIZE = 1000
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
MODEL_INDEX = "model_index.json"

# Fixed English training text for the tokenizers: editing prompts plus common words, so that prompts
# split into real sub-word tokens instead of single bytes.
TOKENIZER_CORPUS = """
a photo of a red apple on a wooden table
replace the sky with a dramatic sunset over the mountains
remove the person in the background and fill with grass
add a small boat on the lake near the shore
change the color of the car to deep blue metallic paint
a cat sitting on a windowsill in the morning light
make the wall look like old red brick with moss
turn the daytime street into a rainy night scene with neon signs
a bowl of fresh fruit with oranges bananas and grapes
paint the door green and add a brass handle
a portrait of a woman with short hair smiling at the camera
the dog runs across the beach while waves crash behind it
insert a vase of yellow flowers on the kitchen counter
a snowy forest with tall pine trees and a frozen river
the old castle stands on a hill under a cloudy sky
a bright modern living room with a white sofa and plants
erase the text on the sign and keep the texture of the metal
a close up of green leaves with water drops after the rain
the city skyline at dusk with lights in the windows
a cup of coffee next to an open book and glasses
fix the scratches on the photo and restore the faded colors
a field of sunflowers under a clear blue summer sky
add soft shadows under the chair and match the lighting
the quick brown fox jumps over the lazy dog
one two three four five six seven eight nine ten
black white gray brown pink purple orange yellow green blue red
left right top bottom center above below inside outside between behind
high quality detailed sharp realistic natural soft warm cold light dark
""".strip()


@dataclass(frozen=True)
class DemoPreset:
    """Sizes of one demo model: the transformer, the VAE and the two text encoders."""

    double_blocks: int
    single_blocks: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    vae_channels: tuple[int, int, int, int]
    clip_hidden: int
    t5_hidden: int


PRESETS: dict[str, DemoPreset] = {
    # A 512x512 edit with 20 steps runs in seconds on 2 CPU cores.
    "demo": DemoPreset(1, 2, 4, 32, (8, 12, 12), (16, 32, 32, 32), 64, 64),
    # Transformer-dominated compute for benchmarks: hidden size 8 heads x 64 = 512, six blocks.
    "bench": DemoPreset(2, 4, 8, 64, (16, 24, 24), (16, 32, 32, 32), 64, 64),
    # The same six blocks at hidden size 16 heads x 64 = 1024: about 4x the linear-layer FLOPs per token, so the
    # VAE, prompt and PNG steps that do not shrink with the mask are a smaller share of a request.
    "bench-wide": DemoPreset(2, 4, 16, 64, (16, 24, 24), (16, 32, 32, 32), 64, 64),
    # Twice the blocks of bench-wide (4 double-stream + 8 single-stream). The real Flux Fill has 19 + 38
    # blocks at hidden size 3072, so there the transformer's share of a request is larger still.
    "bench-large": DemoPreset(4, 8, 16, 64, (16, 24, 24), (16, 32, 32, 32), 64, 64),
    # Smallest useful model for unit tests: hidden size 64.
    "test": DemoPreset(1, 1, 4, 16, (4, 6, 6), (16, 16, 16, 16), 32, 32),
}

# Gain of the seeded re-initialisation: weights ~ N(0, (gain / sqrt(fan_in))^2). With gain 1 every linear
# layer keeps the scale of its input, so the gated residual branches are as large as the residual itself.
# The diffusers default init (and zero-initialised gates in trained checkpoints) makes each block almost
# the identity, which would hide errors in any computation that skips or caches tokens.
TRANSFORMER_INIT_GAIN = 1.0
TRANSFORMER_BIAS_STD = 0.02

_build_lock = threading.Lock()


def build_flux_fill_demo(out_dir: Path, *, preset: str = "demo", seed: int = 0) -> Path:
    """Build a complete Flux Fill pipeline folder in `out_dir` and return `out_dir`.

    Raises ValueError for an unknown preset. The components draw their initial weights from torch's global
    generator, so builds in one process run one at a time and restore the caller's generator state.
    """
    spec = _preset(preset)
    out_dir = Path(out_dir)
    logger.info("Building Flux Fill demo model preset=%s seed=%d into %s", preset, seed, out_dir)

    with _build_lock, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer()
        tokenizer_2 = build_t5_tokenizer()
        pipe = FluxFillPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
            vae=_build_vae(spec, seed),
            text_encoder=_build_clip_text_encoder(spec, tokenizer, seed + 1),
            tokenizer=tokenizer,
            text_encoder_2=_build_t5_encoder(spec, tokenizer_2, seed + 2),
            tokenizer_2=tokenizer_2,
            transformer=_build_transformer(spec, seed + 3),
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def ensure_demo_model(
    root: Path,
    preset: str = "demo",
    *,
    builder: Callable[[Path, str], None] | None = None,
    folder_name: str | None = None,
) -> Path:
    """Return `root/<folder_name or preset>`, building the demo model there first unless it is complete.

    `builder(folder, preset)` writes the pipeline (default: the Flux Fill demo).

    A folder that contains `model_index.json` is complete, because the build writes into a temporary
    sibling folder and renames it into place only when done. When two processes build at once, the
    first rename wins and the other process discards its copy.
    """
    if builder is None:
        _preset(preset)
    root = Path(root)
    target = root / (folder_name or preset)
    if (target / MODEL_INDEX).is_file():
        logger.debug("Reusing demo model %s", target)
        return target

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=root))
    try:
        if builder is None:
            build_flux_fill_demo(staging, preset=preset)
        else:
            builder(staging, preset)
        if target.exists() and not (target / MODEL_INDEX).is_file():
            # Only a crashed copy or a hand-made folder can be here, since complete builds arrive by rename.
            logger.warning("Removing incomplete demo model folder %s (no %s)", target, MODEL_INDEX)
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / MODEL_INDEX).is_file():
                raise
            logger.info("Another process finished demo model %s first; using its copy", target)
        else:
            logger.info("Demo model ready at %s", target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def build_clip_tokenizer() -> CLIPTokenizer:
    """Train a byte-level BPE on `TOKENIZER_CORPUS` with CLIP's normaliser and split rules."""
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    backend = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=eos))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer=trainer)

    vocab = backend.get_vocab(with_added_tokens=True)
    merges = _bpe_merges(backend)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer() -> T5TokenizerFast:
    """Train a unigram model on `TOKENIZER_CORPUS` with T5's special tokens at ids 0 (pad), 1 (eos), 2 (unk)."""
    specials = ["<pad>", "</s>", "<unk>"]
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=specials,
        unk_token="<unk>",
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    scores = _unigram_scores(backend)
    vocab = [(token, 0.0) for token in specials] + [(t, s) for t, s in scores if t not in specials]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _bpe_merges(backend: Tokenizer) -> list[tuple[str, str]]:
    data = json.loads(backend.to_str())
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in data["model"]["merges"]]


def _unigram_scores(backend: Tokenizer) -> list[tuple[str, float]]:
    data = json.loads(backend.to_str())
    return [(token, float(score)) for token, score in data["model"]["vocab"]]


def _preset(name: str) -> DemoPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset={name!r} is unknown; use one of {sorted(PRESETS)}") from None


def _build_vae(spec: DemoPreset, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    # Four blocks give three 2x downsamplings, the 8x factor of the FLUX.1 VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=512,
    )


def _build_clip_text_encoder(spec: DemoPreset, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.clip_hidden,
        intermediate_size=spec.clip_hidden * 2,
        projection_dim=spec.clip_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _build_t5_encoder(spec: DemoPreset, tokenizer: T5TokenizerFast, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=spec.t5_hidden,
        d_kv=spec.t5_hidden // 4,
        d_ff=spec.t5_hidden * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _build_transformer(spec: DemoPreset, seed: int) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=FILL_IN_CHANNELS,
        out_channels=PACKED_LATENT_CHANNELS,
        num_layers=spec.double_blocks,
        num_single_layers=spec.single_blocks,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads,
        joint_attention_dim=spec.t5_hidden,
        pooled_projection_dim=spec.clip_hidden,
        guidance_embeds=True,
        axes_dims_rope=spec.axes_dims_rope,
    )
    reinit_transformer(transformer, seed=seed)
    return transformer.eval()


@torch.no_grad()
def reinit_transformer(transformer: torch.nn.Module, *, seed: int) -> None:
    """Re-draw every linear layer of `transformer` so that each block changes its input substantially.

    Covers attention, MLP, embedder and the AdaLayerNorm modulation layers whose outputs are the shift,
    scale and gate values. Normalisation weights stay at 1.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in transformer.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        std = TRANSFORMER_INIT_GAIN / math.sqrt(module.in_features)
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * TRANSFORMER_BIAS_STD)
