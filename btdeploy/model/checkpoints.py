"""Where reference models come from: presets with seeded random weights, or local checkpoints.

A preset is written once as a real checkpoint folder (weights of every head, config,
tokenizer, processor) in the cache, so the processor and `from_pretrained` work offline
exactly as on a released checkpoint.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import file_hashes, nearest_existing, sha256_of_json, staged_directory
from btdeploy.errors import BtDeployError
from btdeploy.imports import serial_imports
from btdeploy.model.configs import PRESETS, build_config, unchunk_feed_forward, validate_config
from btdeploy.model.heads import CHECKPOINT_HEADS, HEADS, HeadSpec
from btdeploy.progress import say, warn

CHECKPOINT_FORMAT = 2  # bump when the preset writer changes what it writes


def cache_dir() -> Path:
    return Path(os.environ.get("BTDEPLOY_CACHE", Path.home() / ".cache" / "btdeploy"))


@dataclass(frozen=True)
class ModelSource:
    """A preset name or a checkpoint folder, with the seed for anything drawn at random."""

    spec: str  # preset name or absolute folder path
    seed: int = 0

    @property
    def is_preset(self) -> bool:
        return self.spec in PRESETS

    @property
    def checkpoint(self) -> Path:
        """The checkpoint folder, written first for a preset."""
        if self.is_preset:
            return ensure_preset_checkpoint(self.spec, self.seed)
        return Path(self.spec)


def resolve_model(spec: str, seed: int = 0) -> ModelSource:
    """Turn a --model argument into a ModelSource, with a clear error for anything else."""
    if spec in PRESETS:
        return ModelSource(spec, seed)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise BtDeployError(
            f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder; "
            "pass a preset name or a folder written by save_pretrained"
        )
    if not (path / "config.json").is_file():
        raise BtDeployError(f"{path} has no config.json: it is not a transformers checkpoint folder")
    return ModelSource(str(path.resolve()), seed)


# --- seeded random weights -------------------------------------------------------------------


def _generator(seed: int, name: str) -> Any:
    import torch

    # One generator per parameter name: a parameter's value does not depend on which other
    # parameters exist, so a head's missing weights are drawn the same way in every process.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def randomize_(model: Any, seed: int, only: set[str] | None = None) -> None:
    """Draw every parameter (or those named in `only`) from a seeded, name-keyed generator.

    Unlike transformers' init, biases and LayerNorm weights and biases are drawn away from
    0 and 1, so a fusion or quantizer that drops a bias or a LayerNorm affine is visible.
    """
    import torch

    layer_norm_params = {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for param_name, _ in module.named_parameters(recurse=False)
    }
    config = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only is not None and name not in only:
                continue
            noise = torch.randn(param.shape, generator=_generator(seed, name))
            leaf = name.rsplit(".", 1)[-1]
            if name in layer_norm_params:
                value = (1.0 + 0.1 * noise) if leaf == "weight" else 0.1 * noise
            elif leaf == "logit_scale":
                value = torch.full_like(param, float(getattr(config, "logit_scale_init_value", 2.6592)))
            elif leaf == "scaled_factor":
                value = 1.0 + 0.1 * noise
            elif leaf == "beta":
                value = 0.5 + 0.1 * noise
            elif leaf.endswith("bias"):
                value = 0.05 * noise
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))


def _quiet_transformers() -> None:
    with serial_imports():
        from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _with_contrastive_defaults(config: Any) -> Any:
    from btdeploy.model.configs import CONTRASTIVE_DEFAULTS

    for key, value in CONTRASTIVE_DEFAULTS.items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    return config


# --- preset checkpoints ---------------------------------------------------------------------


def preset_checkpoint_dir(preset: str, seed: int) -> Path:
    return cache_dir() / "checkpoints" / f"{preset}-seed{seed}-v{CHECKPOINT_FORMAT}"


def ensure_preset_checkpoint(preset: str, seed: int) -> Path:
    """Write the preset's checkpoint folder once; later calls return it."""
    folder = preset_checkpoint_dir(preset, seed)
    if (folder / "config.json").is_file():
        return folder
    say(f"writing the {preset} preset checkpoint (seed {seed}) to {folder}")
    try:
        # Two processes on a fresh machine may both write it: the same seeded bytes, so the first stays.
        with staged_directory(folder, keep_existing=True) as staging:
            write_random_checkpoint(build_config(preset), staging, seed)
    except OSError as error:  # the cache comes from $HOME or BTDEPLOY_CACHE, not from the command line
        raise BtDeployError(
            f"cannot write the {preset} preset checkpoint to {folder} ({error.strerror or error}"
            f"{f': {error.filename}' if error.filename else ''}): set BTDEPLOY_CACHE to a writable folder "
            "with room for it (`btdeploy doctor` shows the cache)"
        ) from None
    return folder


@dataclass(frozen=True)
class CachedCheckpoint:
    """A preset checkpoint folder in the cache; `current` is False for one of an older format,
    which nothing reads any more."""

    folder: Path
    current: bool
    size_bytes: int


def cached_checkpoints() -> list[CachedCheckpoint]:
    """The preset checkpoints written to the cache, each with its size on disk."""
    root = cache_dir() / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        found.append(CachedCheckpoint(folder, folder.name.endswith(f"-v{CHECKPOINT_FORMAT}"), size))
    return found


def cache_problem() -> str | None:
    """Why preset checkpoints cannot be written to the cache, or None."""
    path = nearest_existing(cache_dir())  # where the first folder would be made
    if not path.is_dir():
        return f"{path} is a file"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def write_random_checkpoint(config: Any, folder: Path, seed: int, heads: tuple[str, ...] = CHECKPOINT_HEADS) -> None:
    """A checkpoint with seeded random weights for the given heads, plus tokenizer and processor.

    Shared weights (everything under `bridgetower.`) are identical across heads because
    each parameter is drawn from a generator keyed by its name.
    """
    import torch
    from safetensors.torch import save_file

    with serial_imports():
        from transformers.initialization import no_init_weights

    _quiet_transformers()
    state: dict[str, Any] = {}
    for head in heads:
        spec = HEADS[head]
        spec.check_config(config)
        torch.manual_seed(seed)
        # randomize_ draws every parameter, so transformers' own init (a third of the time on
        # base) would be thrown away; the buffers are set in __init__ either way.
        with no_init_weights():
            model = spec.model_class_object()(config)
        randomize_(model, seed)
        for name, tensor in model.state_dict().items():
            state.setdefault(name, tensor.detach().clone().contiguous())
        del model
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = [HEADS[head].model_class for head in heads]
    config.save_pretrained(folder)
    build_processor(config).save_pretrained(folder)


def build_processor(config: Any) -> Any:
    """BridgeTowerProcessor for this config: locally trained tokenizer, image size from the config."""
    with serial_imports():
        from transformers import BridgeTowerImageProcessor, BridgeTowerProcessor

    from btdeploy.model.tokenizer import build_tokenizer

    size = int(config.vision_config.image_size)
    patch = int(config.vision_config.patch_size)
    # The processor rounds the resized image down to a multiple of size_divisor; it must divide
    # the image size, or the center crop would pad. crop_size needs "shortest_edge" with the
    # PIL backend that transformers falls back to without torchvision.
    divisor = next(d for d in (32, patch, 1) if size % d == 0)
    image_processor = BridgeTowerImageProcessor(
        size={"shortest_edge": size},
        crop_size={"shortest_edge": size},
        do_center_crop=True,
        size_divisor=divisor,
    )
    tokenizer = build_tokenizer(int(config.text_config.vocab_size))
    tokenizer.model_max_length = int(config.text_config.max_position_embeddings) - 2
    return BridgeTowerProcessor(image_processor=image_processor, tokenizer=tokenizer)


# --- loading ----------------------------------------------------------------------------------

# The files transformers reads weights from (sharded or not); tokenizer and processor files and
# anything else in the folder (a README) do not change what a head computes.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def weights_sha256(folder: Path, hashes: dict[str, str] | None = None) -> str:
    """One hash of a checkpoint's weight files (from `hashes`, the folder's file hashes, if given)."""
    hashes = file_hashes(folder) if hashes is None else hashes
    return sha256_of_json({name: digest for name, digest in hashes.items() if name.endswith(WEIGHT_SUFFIXES)})


def load_config(source: ModelSource) -> Any:
    with serial_imports():
        from transformers import BridgeTowerConfig

    folder = source.checkpoint  # a preset's is written here on first use, outside the try below
    try:
        config = BridgeTowerConfig.from_pretrained(folder)
    except Exception as error:  # transformers raises many types for a bad config.json
        raise BtDeployError(f"could not read {folder / 'config.json'}: {error}") from None
    if getattr(config, "model_type", None) != "bridgetower":
        raise BtDeployError(f"{folder} holds a {config.model_type!r} model, not BridgeTower")
    validate_config(config)
    unchunk_feed_forward(config)
    return config


def head_weight_count(source: ModelSource, head: HeadSpec) -> int:
    """How many weights the head's model has, from its config alone: the model is built on torch's
    meta device, so nothing is read or allocated (what the pipeline's disk estimate starts from)."""
    import torch

    # The config is read first: a preset's checkpoint is written on first use, which the meta
    # device would turn into weights without data (the main job had failed on a fresh machine).
    config = _head_config(source, head)
    with torch.device("meta"):
        model = head.model_class_object()(config)
    return sum(parameter.numel() for parameter in model.parameters())


def _head_config(source: ModelSource, head: HeadSpec) -> Any:
    """The checkpoint's config as the head's model is built from it, refused if the head cannot take it."""
    _quiet_transformers()
    config = _with_contrastive_defaults(load_config(source))
    head.check_config(config)
    return config


@dataclass
class LoadedModel:
    model: Any  # the transformers head model, eval mode, eager attention
    config: Any
    missing_weights: list[str]


def load_head_model(source: ModelSource, head: HeadSpec) -> LoadedModel:
    """The transformers model for one head, weights from the checkpoint.

    Weights the checkpoint lacks are drawn with `randomize_` from the source's seed, so the
    model `check` rebuilds later is exactly the one that was exported.
    """
    import torch

    config = _head_config(source, head)
    folder = source.checkpoint
    try:
        # Always FP32, whatever dtype the weights were saved in (a fine-tune saved in bf16 or fp16):
        # transformers would load them as saved, the export would write a bf16 graph ONNX Runtime
        # cannot load, and the reference would not be the FP32 one every tolerance is measured from.
        # Precision is decided later, in the graph (quantize). No hub kernels: transformers 5.25 asks
        # for them by default and fails where the `kernels` package is missing (a GPU machine's own
        # environment); they come from the hub, and the reference is plain PyTorch.
        model, info = head.model_class_object().from_pretrained(
            folder,
            config=config,
            attn_implementation="eager",
            output_loading_info=True,
            dtype=torch.float32,
            use_kernels=False,
        )
    except OSError as error:
        raise BtDeployError(f"could not load weights from {folder}: {error}") from None
    except Exception as error:
        raise BtDeployError(f"the weights in {folder} do not load into {head.model_class}: {error}") from None
    missing = sorted(info.get("missing_keys", []))
    if missing:
        randomize_(model, source.seed, only=set(missing))
        warn(
            f"{folder} has no weights for {len(missing)} parameter(s) of the {head.name!r} head; they are "
            f"RANDOM (seed {source.seed}) and its outputs are meaningless: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    model.eval()
    return LoadedModel(model=model, config=model.config, missing_weights=missing)
