"""ONNX Runtime backend (onnxruntime-gpu: its CPU provider works on machines without a GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.errors import BtDeployError

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(providers: list[str] | None) -> list[str]:
    import onnxruntime as ort

    if not providers:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    resolved = [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    for provider in resolved:
        if provider not in available:
            raise BtDeployError(
                f"ONNX Runtime provider {provider} is not available here (available: {', '.join(available)})"
            )
    return resolved


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, model_path: Path, output_names: list[str], providers: list[str] | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        if not Path(model_path).is_file():
            raise BtDeployError(f"{model_path} is missing: export the head again (btdeploy export)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.providers = resolve_providers(providers)
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=self.providers)
        except Exception as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BtDeployError(
                f"ONNX Runtime cannot load {model_path} ({first_line}); the file is damaged or incomplete: "
                "export the head again"
            ) from None
        self.output_names = output_names
        graph_outputs = {o.name for o in self.session.get_outputs()}
        lacking = [name for name in output_names if name not in graph_outputs]
        if lacking:
            raise BtDeployError(
                f"{model_path} lacks output(s) {', '.join(lacking)}: it was not exported by btdeploy for this head"
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.description = f"{Path(model_path).name} on {', '.join(self.providers)}"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session_feeds: dict[str, Any] = {name: feeds[name] for name in self.input_names}
        try:
            values = self.session.run(self.output_names, session_feeds)
        except Exception as error:
            raise BtDeployError(f"ONNX Runtime failed to run the model: {str(error).strip().splitlines()[0]}") from None
        return dict(zip(self.output_names, values, strict=True))
