"""The PyTorch reference as a backend: the transformers model the ONNX graph was exported from."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.manifest import Manifest
from btdeploy.backends.base import torch_feed
from btdeploy.errors import BtDeployError
from btdeploy.forks import LoadedProcess
from btdeploy.heap import free_and_give_back
from btdeploy.model.checkpoints import ModelSource, load_head_model, weights_sha256
from btdeploy.model.configs import config_fingerprint
from btdeploy.model.heads import HeadSpec, get_head
from btdeploy.model.towers import head_module
from btdeploy.progress import say


@functools.cache
def _say_once(message: str) -> None:
    say(message)  # a bench builds the variant once per build order; only the first compiles


class TorchBackend:
    name = "torch"

    def __init__(
        self, model: Any, head: HeadSpec, device: str = "cpu", dtype: str = "fp32", compile: bool = False
    ) -> None:
        import torch

        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.module = head_module(model, head).to(device=device, dtype=torch_dtype)
        if compile:
            # Inductor with dynamic shapes: batch and text length vary; the first call compiles.
            self.module = torch.compile(self.module, dynamic=True)
            _say_once(
                "torch.compile (inductor): the first call compiles, and again for the first batch past 1 "
                "(a minute or more each on base, on 2 cores); later calls of any shape reuse it"
            )
        # Inductor's dynamic shapes specialize a size of 1: batch 1 and batch 4 compile once each.
        self.compiles_per_size_one_kind = compile
        self.head = head
        self.device = device
        self.torch_dtype = torch_dtype
        self.loaded_in = LoadedProcess(self, "torch's thread pool", on_gpu=device != "cpu", process_wide=True)
        mode = "torch.compile inductor" if compile else "eager"
        self.description = f"transformers {head.model_class} ({mode}, {dtype}) on {device}"

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        device: str = "cpu",
        dtype: str = "fp32",
        compile: bool = False,
        checkpoint: Path | None = None,
    ) -> TorchBackend:
        """Rebuild exactly the model that was exported: same source, same seed for anything random.
        `checkpoint`: the source's folder where it is no longer at the recorded path."""
        model_info = manifest.data["model"]
        seed = int(model_info["seed"])
        recorded = model_info.get("weights_sha256")  # absent in exports before it was recorded
        if checkpoint is not None:
            if not (checkpoint / "config.json").is_file():
                raise BtDeployError(f"{checkpoint} has no config.json: give the checkpoint folder the export came from")
            source = ModelSource(str(checkpoint.resolve()), seed)
        else:
            source = ModelSource(model_info["source"], seed)
            if not source.is_preset and not source.checkpoint.is_dir():
                raise BtDeployError(
                    f"the checkpoint {source.spec} this head was exported from is gone: cannot rebuild the reference; "
                    "if it has moved, pass its folder (--checkpoint DIR, or checkpoint=DIR with backend='torch')"
                )
        head = get_head(manifest.head)
        if recorded is not None and (now := weights_sha256(source.checkpoint)) != recorded:
            if checkpoint is not None:
                raise BtDeployError(
                    f"the weights at {checkpoint} are not the ones this head was exported from (sha256 "
                    f"{recorded[:12]} recorded, {now[:12]} there): pass the checkpoint the export was made from"
                )
            raise BtDeployError(
                f"the weights at {source.spec} changed since this head was exported (sha256 {recorded[:12]} then, "
                f"{now[:12]} now): the reference would not be the exported model; export again from them, or "
                "check against the checkpoint the export was made from"
            )
        loaded = load_head_model(source, head)
        if config_fingerprint(loaded.config) != model_info["config_sha256"]:
            raise BtDeployError(
                f"the checkpoint at {source.spec} changed since the export (config hash differs): export again"
            )
        return cls(loaded.model, head, device, dtype, compile)

    def __del__(self) -> None:
        # Where the module is in a reference cycle it goes later, with the collector.
        free_and_give_back(self, "module")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.loaded_in.first_run_in_child():
            self._forked()
        args = [torch.from_numpy(torch_feed(feeds[name])).to(self.device) for name in self.head.input_names]
        args = [a.to(self.torch_dtype) if a.is_floating_point() else a for a in args]
        with torch.no_grad():
            values = self.module(*args)
        return {name: value.float().cpu().numpy() for name, value in zip(self.head.output_names, values, strict=True)}

    def _forked(self) -> None:
        """First run in a process forked after a torch model was loaded (gunicorn --preload,
        multiprocessing's fork): this one, or one the parent loaded before this was loaded here.
        torch's CPU thread pool (OpenMP) is the process's and does not survive fork: a child that ran
        on more than one thread hung for good, as the transformers model does. On one thread it runs."""
        import torch

        if torch.get_num_threads() > 1:
            torch.set_num_threads(1)
            self.loaded_in.say_one_thread()
