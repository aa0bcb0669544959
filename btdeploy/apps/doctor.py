"""`btdeploy doctor`: what this machine can run, and the exact command for what it cannot."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from btdeploy import hugepages
from btdeploy.apps.disk_space import size_text
from btdeploy.artifacts.files import nearest_existing
from btdeploy.artifacts.graph_names import STEMS
from btdeploy.artifacts.manifest import Manifest, head_folders, package_version, read_manifest
from btdeploy.backends.provider_probe import start_problem
from btdeploy.backends.tensorrt import environment as tensorrt_env
from btdeploy.backends.tensorrt.environment import INSTALL_TENSORRT, WHERE
from btdeploy.cpu import EXACT_INTEGER_SUMS, NATIVE_BF16, describe_cpu, exact_integer_sums, native_bf16
from btdeploy.errors import BtDeployError
from btdeploy.imports import INSTALL_PEERS, INSTALL_SERVE, onnxruntime_distribution
from btdeploy.model.checkpoints import cache_dir, cache_problem, cached_checkpoints
from btdeploy.model.media import has_processor, read_by_transformers


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def _artifacts(folder: Path) -> list[str]:
    """Per head its graphs and engines, then its split graphs: named by what follows the stem when
    text, vision and fusion have the same ones, as they do after a pipeline."""
    lines = []
    for head_folder in head_folders(folder, None):
        manifest = read_manifest(head_folder)
        graphs = sorted(p.name for p in head_folder.glob("model*.onnx"))
        engines = sorted(p.name for p in head_folder.glob("engine.*.plan"))
        lines.append(f"  {manifest.head:<5} {', '.join(graphs + engines)}")
        lines.extend(f"        {line}" for line in _processor_lines(manifest))
        split = {stem: sorted(p.name[len(stem) :] for p in head_folder.glob(f"{stem}.*onnx")) for stem in STEMS[1:]}
        if len({tuple(endings) for endings in split.values()}) == 1:
            if split["text"]:
                lines.append(f"        split graphs {{text,vision,fusion}}: {', '.join(split['text'])}")
            continue
        for stem, endings in split.items():
            lines.append(f"        split graphs {stem}: {', '.join(stem + ending for ending in endings) or 'none'}")
    return lines


def _processor_lines(manifest: Manifest) -> list[str]:
    """A line where the head's processor is not read by btdeploy itself (the commands then import
    transformers and torch, seconds more to start) or cannot be read; none where all is well."""
    if not has_processor(manifest):
        return []
    try:
        why = read_by_transformers(manifest)
    except BtDeployError as error:
        return [f"processor: {error}"]
    return [f"processor read with transformers, which imports torch: {why}"] if why else []


def _checkpoint_cache() -> str:
    """Where the preset checkpoints are written (the first command on a preset writes it: 1.4 GB
    for base), what is there, and whether it can be written."""
    root = cache_dir() / "checkpoints"
    problem = cache_problem()
    if problem:
        return f"{root}: cannot be written ({problem}) -> set BTDEPLOY_CACHE to a writable folder"
    cached = cached_checkpoints()
    held = [f"{c.folder.name} {size_text(c.size_bytes)}" for c in cached if c.current]
    stale = [c for c in cached if not c.current]
    parts = [f"{root} (BTDEPLOY_CACHE moves it): " + (", ".join(held) if held else "none written yet")]
    if stale:
        parts.append(
            f"{len(stale)} of an older format that nothing reads ({size_text(sum(c.size_bytes for c in stale))}): "
            + ", ".join(c.folder.name for c in stale)
            + " -> can be deleted"
        )
    parts.append("a preset not there is written on first use")
    parts.append(f"{size_text(shutil.disk_usage(nearest_existing(root)).free)} free")
    return "; ".join(parts)


@dataclass(frozen=True)
class _Found:
    """What the installed-packages part of the report found, which the can-run part reads."""

    gpu: tuple[str, tuple[int, int]] | None
    tensorrt: str | None
    modelopt: str | None
    providers: list[str]
    platform_package: str  # the ONNX Runtime package this platform installs

    @property
    def can_build(self) -> bool:
        return bool(self.gpu and self.tensorrt)


def doctor_report(folder: Path | None = None, polygraphy: bool = False) -> tuple[list[str], bool]:
    """Lines to print, and whether the TensorRT path can run here. The Polygraphy commands of the
    folder's TensorRT graphs are printed where TensorRT runs, or when `polygraphy` asks for them."""
    lines, found = _installed()
    lines += ["", "can run here:", *_can_run(found)]
    if folder is not None:
        lines += ["", *_folder(folder, found.can_build or polygraphy)]
    return lines, found.can_build


def _installed() -> tuple[list[str], _Found]:
    """The CPU, the GPU, and each package btdeploy uses, with how to install what is missing."""
    lines: list[str] = []
    torch_version = package_version("torch")
    gpu = tensorrt_env.gpu()
    ort_version = package_version("onnxruntime-gpu")
    trt = tensorrt_env.tensorrt_version()  # looked up on the module, so tests can stand in for it
    lines.append(f"CPU              {describe_cpu()}")
    lines.append(f"torch            {torch_version or 'not installed'}")
    # The reference model's code, and the export's: a bug report or a parity change needs its version.
    lines.append(f"transformers     {package_version('transformers') or 'not installed'}")
    if gpu:
        import torch

        name, (major, minor) = gpu
        lines.append(f"GPU              {name} (compute capability {major}.{minor}), CUDA {torch.version.cuda}")
    else:
        lines.append("GPU              none visible to torch (torch.cuda.is_available() is False)")
    lines.append(f"NVIDIA driver    {_driver() or 'none (nvidia-smi not found)'}")
    cpu_build = package_version("onnxruntime")  # the same module without CUDA: a GPU machine's image may hold it
    providers: list[str] = []
    if ort_version or cpu_build:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    platform_package = onnxruntime_distribution()  # aarch64, macOS: the CPU package, as pyproject.toml takes it
    if ort_version:
        lines.append(f"onnxruntime-gpu  {ort_version}, providers: {', '.join(providers)}")
    elif cpu_build and platform_package == "onnxruntime":
        lines.append(
            f"onnxruntime      {cpu_build} (the CPU package this platform installs: PyPI has no onnxruntime-gpu "
            f"1.24 for it), providers: {', '.join(providers)}"
        )
    elif cpu_build:
        lines.append(
            f"onnxruntime-gpu  not installed; onnxruntime {cpu_build} (CPU only) is -> pip uninstall -y onnxruntime "
            "&& pip install onnxruntime-gpu (the same module: never both)"
        )
    else:
        other = "onnxruntime" if platform_package == "onnxruntime-gpu" else "onnxruntime-gpu"
        lines.append(f"{platform_package:<16} not installed -> pip install {platform_package} (never beside {other})")
    modelopt = package_version("nvidia-modelopt")
    modelopt_install = "not installed -> pip install 'nvidia-modelopt[onnx]==0.47.0'"
    lines.append(f"nvidia-modelopt  {modelopt or modelopt_install}")
    lines.append(f"tensorrt         {trt or f'not installed -> {INSTALL_TENSORRT} {WHERE}'}")
    lines.append(f"huge pages       {hugepages.status().describe()}")
    lines.append(f"checkpoints      {_checkpoint_cache()}")
    return lines, _Found(gpu, trt, modelopt, providers, platform_package)


def _can_run(found: _Found) -> list[str]:
    """Each part of btdeploy: whether it runs on this machine, and what it needs where it does not."""
    lines: list[str] = []
    if found.modelopt:
        lines.append("  export, optimize, quantize, check and bench on ONNX Runtime CPU: yes")
    else:
        lines.append(
            "  export, optimize, check and bench on ONNX Runtime CPU: yes; quantize: no (needs nvidia-modelopt)"
        )
    ray, tritonclient = package_version("ray"), package_version("tritonclient")
    serving = f"yes (Ray {ray}, tritonclient {tritonclient})" if ray and tritonclient else f"no -> {INSTALL_SERVE}"
    lines.append(f"  serve and triton-repo: {serving}")
    openvino = package_version("openvino")
    peers = f"yes ({openvino})" if openvino else f"no -> {INSTALL_PEERS}"
    lines.append(f"  OpenVINO (run, rank, serve and check with --backend openvino; a peer in bench): {peers}")
    bf16 = native_bf16()
    bf16_line = "  bf16 on the CPU (the PyTorch reference, OpenVINO):"
    lines.append(
        f"{bf16_line} yes ({', '.join(bf16)})"
        if bf16
        else f"{bf16_line} no (needs {' or '.join(NATIVE_BF16)}; emulated, it would be slower than FP32)"
    )
    exact = exact_integer_sums()
    int8_line = "  INT8 on ONNX Runtime's CPU kernels (the ort int8 graphs):"
    lines.append(
        f"{int8_line} yes, every product summed in 32 bits ({', '.join(exact)})"
        if exact
        else f"{int8_line} yes, summed in 32 bits as a VNNI machine does by recoding the weights (exact_sums, "
        f"the default); without {', '.join(EXACT_INTEGER_SUMS)} ONNX Runtime's own kernel sums pairs of products "
        "in saturating 16-bit integers, 1.2-1.3x faster and further from FP32 (exact_sums=False in "
        "btdeploy.load): check a graph that way first (btdeploy check DIR --flavour ort --precision int8 "
        "--no-exact-sums)"
    )
    if not found.gpu:
        lines.append("  ONNX Runtime CUDA: no (needs an NVIDIA GPU)")
    elif "CUDAExecutionProvider" not in found.providers and found.platform_package == "onnxruntime":
        lines.append(
            "  ONNX Runtime CUDA: no (PyPI has no onnxruntime-gpu 1.24 for this platform; TensorRT runs on the GPU)"
        )
    elif "CUDAExecutionProvider" not in found.providers:
        lines.append("  ONNX Runtime CUDA: no -> pip install onnxruntime-gpu")
    else:  # listed on any machine: does it start with this machine's CUDA libraries?
        problem = start_problem("CUDAExecutionProvider")
        lines.append(f"  ONNX Runtime CUDA: {f'no -> {problem}' if problem else 'yes'}")
    if found.can_build:
        lines.append("  TensorRT build and run: yes")
    elif found.gpu:
        lines.append(f"  TensorRT build and run: no -> {INSTALL_TENSORRT}")
    else:
        lines.append("  TensorRT build and run: no -> needs an NVIDIA GPU; there, " + INSTALL_TENSORRT)
    return lines


def _folder(folder: Path, with_polygraphy: bool) -> list[str]:
    """The artifacts of an export folder, and how to debug its TensorRT graphs with Polygraphy."""
    lines = [f"btdeploy artifacts in {folder}:", *(_artifacts(folder) or ["  none"])]
    debug = _polygraphy_commands(folder)
    if debug and with_polygraphy:
        lines.append("")
        lines.append("to debug a TensorRT mismatch layer by layer (Polygraphy, installed with btdeploy):")
        lines.extend(debug)
    elif debug:
        lines.append("")
        lines.append(
            f"{len(debug)} TensorRT graph(s) here: `btdeploy doctor {folder} --polygraphy` prints a Polygraphy "
            "command per graph to debug a TensorRT mismatch layer by layer, to run where TensorRT runs"
        )
    return lines


def _polygraphy_commands(folder: Path) -> list[str]:
    """`polygraphy run` per TensorRT graph: TensorRT against ONNX Runtime on the same inputs, every
    tensor marked as an output, at the head's engine profile (the shapes `build` uses)."""
    from btdeploy.artifacts.graph_names import Precision, graph_file
    from btdeploy.backends.tensorrt.operators import FLAVOUR_LINES
    from btdeploy.backends.tensorrt.profiles import derive_profile
    from btdeploy.model.heads import get_head

    commands = []
    for head_folder in head_folders(folder, None):
        manifest = read_manifest(head_folder)
        shapes = derive_profile(get_head(manifest.head), manifest.config).input_shapes()
        profile = " ".join(
            f"--trt-{kind}-shapes "
            + " ".join(f"{name}:{list(shape[index])}".replace(" ", "") for name, shape in shapes.items())
            for index, kind in enumerate(("min", "opt", "max"))
        )
        for flavour in FLAVOUR_LINES:
            for precision in (Precision.FP16, Precision.INT8):
                path = head_folder / graph_file(flavour, precision)
                if path.is_file():
                    commands.append(
                        f"  polygraphy run {path} --trt --strongly-typed --onnxrt --trt-outputs mark all "
                        f"--onnx-outputs mark all --fail-fast {profile}"
                    )
    return commands
