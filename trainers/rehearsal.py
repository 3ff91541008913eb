"""Hub base models at their real architectures with random weights, built offline: the groundwork of
rehearsing the hub presets on a machine that cannot reach the hub (issue 29).

`ARCHITECTURES` holds the published configs (each model's `unet/config.json`, `vae/config.json`,
`text_encoder/config.json` and `scheduler/scheduler_config.json` on the hub) of the models the hub
presets name, plus `tiny`: the same component types as Stable Diffusion 1.5, narrow, at 64 px (the
tests). `build(name)` makes one with random weights (seed 0); `save_base_model` writes it as the
diffusers folder `load_base_model` reads. Stable Diffusion's tokenizer is CLIP's own BPE vocabulary,
converted from the copy the `clip` package (openai-clip, a pyiqa dependency) ships (49,408 tokens, the ids `clip.tokenize` gives), so a
rehearsal tokenizes prompts as the real model does.

Random weights change nothing in what a step costs in time or memory; they make every quality figure
meaningless. Nothing built here is ever a quality figure.

`stage(config)` is the rehearsal itself (`model.rehearsal: true`), applied once where presets are
loaded: every hub model the config names is written, at random weights, as the local file of the
same architecture (a diffusers folder, a pyiqa architecture's weights, torch-fidelity's Inception),
the hub data set as a local `save_to_disk` set of RGB crops of scikit-learn's two bundled photographs,
and the config is pointed at them. From there the run is the product's own, through the loaders a
user's local files take; nothing downstream knows it is a rehearsal but the flag, which the output
and MLflow carry. Staged files are cached under $ACPO_REHEARSAL_CACHE (~/.cache/acpo/rehearsal).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from trainers.common.errors import ConfigError

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
CHURCH256 = "google/ddpm-church-256"
SD3 = "stabilityai/stable-diffusion-3.5-medium"
FLUX = "black-forest-labs/FLUX.1-dev"

_SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                     prediction_type="epsilon", steps_offset=1, clip_sample=False)
# The scheduler each hub model ships in its model_index.json (its class, and the settings beyond the training
# schedule's), which a rehearsal's base carries as the hub's does, and so its export: SD 1.5 PNDM, SDXL Euler.
_SD15_SHIPPED = ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False))
_SDXL_SHIPPED = ("EulerDiscreteScheduler", dict(timestep_spacing="leading", interpolation_type="linear"))

ARCHITECTURES = {
    SD15: {
        "resolution": 512,
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
                    scaling_factor=0.18215),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                     hidden_act="quick_gelu", projection_dim=768),
        "scheduler": _SD_SCHEDULER,
        "shipped_scheduler": _SD15_SHIPPED,
    },
    "tiny": {  # SD 1.5's block types and depth pattern, narrow, at 64 px
        "resolution": 64,
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=4,
                     norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
                    norm_num_groups=8, scaling_factor=0.18215),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                     hidden_act="quick_gelu"),
        "scheduler": _SD_SCHEDULER,
        "shipped_scheduler": _SD15_SHIPPED,
    },
    SDXL: {  # two text encoders (CLIP ViT-L and OpenCLIP bigG, penultimate layers concatenated), size conditioning
        "resolution": 1024,
        "unet": dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                     attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
                    scaling_factor=0.13025, force_upcast=True),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                     hidden_act="quick_gelu", projection_dim=768),
        "text_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                       hidden_act="gelu", projection_dim=1280),
        "scheduler": _SD_SCHEDULER,
        "shipped_scheduler": _SDXL_SHIPPED,
    },
    "tiny-xl": {  # SDXL's block types, two text encoders and size conditioning, narrow, at 64 px
        "resolution": 64,
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
                     norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
                    norm_num_groups=8, scaling_factor=0.13025),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                     hidden_act="quick_gelu"),
        "text_2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       hidden_act="gelu", projection_dim=32),
        "scheduler": _SD_SCHEDULER,
        "shipped_scheduler": _SDXL_SHIPPED,
    },
    SD3: {  # MMDiT-X: joint text/image blocks, the first 13 with a second self-attention; two CLIPs with projection
        # (the T5-XXL encoder is left out, as SD3's pipeline allows: its sentencepiece tokenizer is on the hub only)
        "resolution": 1024,
        "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
                    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                     hidden_act="quick_gelu", projection_dim=768),
        "text_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                       hidden_act="gelu", projection_dim=1280),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
    },
    "tiny-sd3": {  # SD3.5 medium's block kinds (dual attention, RMS q/k norm), two CLIPs, narrow, at 64 px
        "resolution": 64,
        "transformer": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
                            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
                    norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                     hidden_act="quick_gelu", projection_dim=32),
        "text_2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       hidden_act="gelu", projection_dim=32),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
    },
    FLUX: {  # 19 double-stream and 38 single-stream blocks, guidance-distilled; CLIP-L (pooled) and T5-XXL (left out here, as
        # for SD3; Flux cannot run without it, so this entry counts parameters on the meta device and is not staged)
        "resolution": 1024,
        "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                     hidden_act="quick_gelu"),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096),
    },
    CHURCH256: {  # the LSUN-256 DDPMs share this UNet: attention at 16x16 only
        "resolution": 256,
        "unet": dict(sample_size=256, in_channels=3, out_channels=3, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                     down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
                     norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1),
        "scheduler": dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon",
                          clip_sample=True, variance_type="fixed_small"),
    },
}


def clip_tokenizer(model_max_length: int = 77):
    """CLIP's BPE tokenizer (Stable Diffusion's) as a transformers `CLIPTokenizer`, from the vocabulary
    and merges the `clip` package ships (`clip/bpe_simple_vocab_16e6.txt.gz`): no download."""
    from clip.simple_tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)  # rank order is the merge order
    return CLIPTokenizer(vocab=dict(bpe.encoder), merges=[tuple(pair) for pair in merges], model_max_length=model_max_length)


def build(name: str, seed: int = 0, device: str | torch.device = "cpu"):
    """The architecture `name` (a key of ARCHITECTURES) with random weights drawn from `seed`, as a
    `DiffusionModel`. `device="meta"` builds it without memory (parameter counts)."""
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainers.denoiser.flow_transformer import FlowTransformer
    from trainers.models import DiffusionModel

    if name not in ARCHITECTURES:
        raise KeyError(f"no rehearsal architecture for {name!r} (known: {', '.join(ARCHITECTURES)})")
    spec = ARCHITECTURES[name]
    torch.manual_seed(seed)
    flow = "transformer" in spec
    scheduler = (FlowMatchEulerDiscreteScheduler if flow else DDPMScheduler)(**spec["scheduler"])
    if "shipped_scheduler" in spec:
        import diffusers

        class_name, settings = spec["shipped_scheduler"]
        shipped = getattr(diffusers, class_name).from_config({**scheduler.config, **settings})
    else:  # the pixel DDPM and SD3 ship their training scheduler
        shipped = scheduler
    with torch.device(device):
        if "text" not in spec:  # a pixel DDPM
            return DiffusionModel(denoiser=UNet2DModel(**spec["unet"]), scheduler=scheduler, sampling_scheduler=shipped)
        tokenizer = clip_tokenizer(spec["text"]["max_position_embeddings"])

        def text_config(options):
            return CLIPTextConfig(vocab_size=len(tokenizer), **options, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

        # SD3's first CLIP has a projection (its pooled output conditions the transformer); SD 1.5's, SDXL's and Flux's none
        text_encoder = (CLIPTextModelWithProjection if "projection_dim" in spec["text"] and flow else CLIPTextModel)(text_config(spec["text"]))
        second = {}
        if "text_2" in spec:  # SDXL, SD3: the second tokenizer is the same vocabulary (the hub's pads with "!", here with end-of-text)
            second = {"text_encoder_2": CLIPTextModelWithProjection(text_config(spec["text_2"])).requires_grad_(False).eval(),
                      "tokenizer_2": tokenizer}
        if flow:
            from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

            kind = SD3Transformer2DModel if "pos_embed_max_size" in spec["transformer"] else FluxTransformer2DModel
            denoiser = FlowTransformer(kind(**spec["transformer"]))
        else:
            denoiser = UNet2DConditionModel(**spec["unet"])
        return DiffusionModel(denoiser=denoiser, scheduler=scheduler, sampling_scheduler=shipped, vae=AutoencoderKL(**spec["vae"]),
                              text_encoder=text_encoder.requires_grad_(False).eval(), tokenizer=tokenizer, **second)


# ----------------------------------------------------------------------------------- the rehearsal

NOTE = ("REHEARSAL: every model in this run has RANDOM weights (model.rehearsal: true) and the data are crops of two "
        "bundled photographs; its figures measure the code path and its cost, never quality")
WEIGHTS_TAG = {"acpo.weights": "random (rehearsal)"}  # on every MLflow run of a rehearsal

# pyiqa's CLIP-based metrics build OpenAI's CLIP (laion_aes ViT-L/14, clipscore ViT-B/32, clipiqa RN50), as published
# (clip/model.py's CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
# context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)).
_CLIP = {"ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12), "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
         "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)}
INCEPTION = "inception-v3-compat"
REFERENCE_IMAGES = 64  # the staged data set: training images and the FID reference


def cache_root() -> Path:
    return Path(os.environ.get("ACPO_REHEARSAL_CACHE") or Path.home() / ".cache" / "acpo" / "rehearsal")


def _slug(name: str) -> str:
    return name.replace("/", "--")


@contextlib.contextmanager
def _written(path: Path):
    """Yield a temporary path beside `path`, moved to it once complete: a crash leaves no half file."""
    partial = path.with_name(f".{path.name}.partial")
    if partial.is_dir():  # what a killed build left
        shutil.rmtree(partial)
    partial.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    yield partial
    partial.rename(path)


def staged_base(name: str, resolution: int, seed: int = 0) -> Path:
    """`build(name)` saved as a diffusers folder, its sample size set to `resolution` (a UNet's weights
    do not depend on it: SD 1.5's widths at 64 px are the tests' cheap real shape)."""
    from trainers.models import save_base_model

    path = cache_root() / f"{_slug(name)}-{resolution}px-random-seed{seed}"
    if (path / "model_index.json").is_file() and not ships_its_scheduler(path, name):
        shutil.rmtree(path)  # cached by an earlier version, with the training scheduler: built again
    if not (path / "model_index.json").is_file():
        if name == FLUX:
            raise ConfigError(f"model.base: {FLUX} is not rehearsed here: it needs its T5-XXL encoder, whose tokenizer is on the hub only, "
                              "and 48 GB for its fp32 weights (ARCHITECTURES counts its parameters)")
        model = build(name, seed)
        network = getattr(model.denoiser, "transformer", model.denoiser)  # a FlowTransformer's diffusers model, or the UNet
        network.register_to_config(sample_size=resolution // model.vae_scale_factor if model.latent else resolution)
        with _written(path) as partial:
            save_base_model(model, partial)
    return path


def ships_its_scheduler(folder: Path, name: str) -> bool:
    """The cached base names the scheduler class the hub model ships (`shipped_scheduler`, else the training one)."""
    spec = ARCHITECTURES.get(name, {})
    expected = spec["shipped_scheduler"][0] if "shipped_scheduler" in spec else (
        "FlowMatchEulerDiscreteScheduler" if "transformer" in spec else "DDPMScheduler")
    try:
        return json.loads((folder / "model_index.json").read_text()).get("scheduler", [None, None])[1] == expected
    except (OSError, ValueError, AttributeError, IndexError, TypeError):
        return False


def staged_images(data, captions: list[str], count: int = REFERENCE_IMAGES) -> Path:
    """RGB crops (random size and place, seeded) of scikit-learn's two bundled photographs at the data's
    resolution, as a `datasets` folder with the data's image column and, when it has one, its caption
    column (the captions cycled): the hub set's form, offline."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    columns = (data.image_column, data.caption_column)
    path = cache_root() / f"photos-{data.resolution}px-{count}-{'-'.join(filter(None, columns))}"
    if path.is_dir():
        return path
    photos = [Image.fromarray(array) for array in load_sample_images().images]
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.size) // 3, min(photo.size) + 1))
        left, top = (int(rng.integers(0, extent - side + 1)) for extent in photo.size)
        images.append(photo.crop((left, top, left + side, top + side)).resize((data.resolution,) * 2, Image.BICUBIC))
    table = {data.image_column: images}
    if data.caption_column:
        table[data.caption_column] = [captions[i % len(captions)] for i in range(count)]
    datasets.disable_progress_bars()
    with _written(path) as partial:
        datasets.Dataset.from_dict(table).save_to_disk(str(partial))
    return path


def staged_quality(metric: str, seed: int = 0) -> dict:
    """pyiqa's `metric` at random weights as {arch, weights, name}: the architecture pyiqa builds,
    initialised as its code does (seeded), saved with its CLIP under `clip_model.` where it has one
    (eval.quality.create_pyiqa_arch reads that file without any download)."""
    import pyiqa
    from safetensors.torch import save_file

    from eval.quality import CLIP_PREFIX, clip_loaders, offline_arch_options

    path = cache_root() / f"{metric}-random-seed{seed}.safetensors"
    if not path.is_file():
        torch.manual_seed(seed)
        built = {}

        def random_clip(name, openai):
            import clip.model
            import pyiqa.archs.clip_model

            built["clip"] = (clip.model if openai else pyiqa.archs.clip_model).CLIP(*_CLIP[name])
            return built["clip"]

        with clip_loaders(random_clip):
            net = pyiqa.create_metric(metric, **offline_arch_options(metric)).net
        state = dict(net.state_dict())
        if "clip" in built:
            state.update({f"{CLIP_PREFIX}{key}": value for key, value in built["clip"].state_dict().items()})
        with _written(path) as partial:
            save_file({key: value.contiguous() for key, value in state.items()}, str(partial))
    return {"arch": metric, "weights": str(path), "name": f"{metric} (random weights)"}


def staged_inception(seed: int = 0) -> Path:
    """torch-fidelity's `inception-v3-compat` architecture at random weights (Kaiming-normal
    convolutions and linear layers: PyTorch's default initialisation makes its deep features vanish, every
    image one point, FID 0). eval.fidelity loads it through torch-fidelity with this file in place of
    the download."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception
    from safetensors.torch import save_file

    path = cache_root() / f"{INCEPTION}-random-seed{seed}.safetensors"
    if not path.is_file():
        torch.manual_seed(seed)
        # torch-fidelity builds the network, downloads its weights and loads them in one constructor:
        # here nothing is downloaded and nothing loaded
        originals = inception.load_state_dict_from_url, inception.FeatureExtractorInceptionV3.load_state_dict
        inception.load_state_dict_from_url = lambda *_, **__: {}
        inception.FeatureExtractorInceptionV3.load_state_dict = lambda *_, **__: None
        try:
            net = inception.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
        finally:
            inception.load_state_dict_from_url, inception.FeatureExtractorInceptionV3.load_state_dict = originals
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        with _written(path) as partial:
            save_file({key: value.contiguous() for key, value in net.state_dict().items()}, str(partial))
    return path


def _is_hub(path: str) -> bool:
    return bool(path) and not Path(path).expanduser().exists() and not path.startswith((".", "/", "~"))


def _staged_spec(spec, option: str):
    """A pyiqa metric name -> its random-weights {arch, weights, name}; local specs stay."""
    from eval.prompt_rewards import PROMPT_REWARDS
    from eval.quality import pyiqa_metric_names

    if not isinstance(spec, str):
        return spec
    if spec in PROMPT_REWARDS:
        raise ConfigError(f"{option}: no rehearsal for {spec!r} (a prompt-conditioned reward model outside pyiqa); "
                          "give it local weights or leave it out of the rehearsal")
    return staged_quality(spec) if spec in pyiqa_metric_names() else spec


def _stage_objective(options, prefix: str):
    """The objective's quality models (`metric:` of nr_iqa, `model:` of decoupled rewards, ...)."""
    if not isinstance(options, dict):
        return options
    return {key: _staged_spec(value, f"{prefix}.{key}") if key in ("metric", "model") else _stage_objective(value, f"{prefix}.{key}")
            for key, value in options.items()}


def stage(config) -> None:
    """Point `config` (a validated Config, or the preset holding one) at random-weight local stand-ins
    of every hub model and data set it names, building them on first use. The edge calls this once,
    before anything loads; `model.rehearsal` stays set, for the output and MLflow to say so."""
    base, data, evaluation = config.model.base, config.data, config.eval
    if _is_hub(base):
        if base not in ARCHITECTURES:
            raise ConfigError(f"model.base: no rehearsal architecture for {base!r} (known: {', '.join(ARCHITECTURES)}); "
                              "a local folder rehearses as it is")
        config.model.base = str(staged_base(base, data.resolution))
    prompts = list(evaluation.prompts) or [data.caption.format(label="a photograph")]
    hub_data = data.source == "hf" and _is_hub(data.path)
    if hub_data:
        data.path = str(staged_images(data, prompts))
    if evaluation.reference.startswith("hf:"):
        from trainers.image_sets import parse_hf_reference

        name, _ = parse_hf_reference(evaluation.reference)
        if _is_hub(name):
            evaluation.reference = f"hf:{staged_images(data, prompts)}:train"
    evaluation.trained_quality = _staged_spec(evaluation.trained_quality, "eval.trained_quality")
    evaluation.heldout_quality = _staged_spec(evaluation.heldout_quality, "eval.heldout_quality")
    evaluation.extra_quality = {name: _staged_spec(spec, f"eval.extra_quality.{name}") for name, spec in evaluation.extra_quality.items()}
    if evaluation.clip_score:
        evaluation.clip_score = _staged_spec(evaluation.clip_score, "eval.clip_score")
    if evaluation.feature_extractor == INCEPTION and not evaluation.feature_extractor_weights:
        evaluation.feature_extractor_weights = str(staged_inception())
    config.objective = _stage_objective(config.objective, "objective")
