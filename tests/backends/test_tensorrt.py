"""The TensorRT path without TensorRT: profiles, engine names and records, compatibility, and the
messages a machine without TensorRT or a GPU gets. Engines themselves: tests/test_tensorrt_gpu.py."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

import btdeploy
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.tensorrt import environment as tensorrt_env
from btdeploy.backends.tensorrt.engines import EngineRecord, check_compatible, engine_file, find_engine, record_file
from btdeploy.backends.tensorrt.profiles import EngineProfile, ShapeRange, derive_profile
from btdeploy.cli import main
from btdeploy.errors import BtDeployError
from btdeploy.model.configs import max_text_length
from btdeploy.model.heads import HEADS


@pytest.fixture()
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorrt_env, "tensorrt_version", lambda: None)


def _profile(tiny_export: Path) -> EngineProfile:
    manifest = read_manifest(tiny_export / "itm")
    return derive_profile(HEADS["itm"], manifest.config)


def test_default_profile_comes_from_the_head_declaration(tiny_export: Path) -> None:
    config = read_manifest(tiny_export / "itm").config
    profile = derive_profile(HEADS["itm"], config)
    assert profile.batch == ShapeRange(*HEADS["itm"].engine_batch) == ShapeRange(1, 8, 32)
    limit = max_text_length(config)
    assert profile.text_length == ShapeRange(1, min(40, limit), min(512, limit))
    size = config.vision_config.image_size
    shapes = profile.input_shapes()
    assert shapes["input_ids"] == ((1, 1), (8, min(40, limit)), (32, min(512, limit)))
    assert shapes["pixel_values"] == ((1, 3, size, size), (8, 3, size, size), (32, 3, size, size))
    custom = derive_profile(HEADS["mlm"], config, batch="2:4:6", seq_len="3:5:7")
    assert custom.batch == ShapeRange(2, 4, 6) and custom.text_length == ShapeRange(3, 5, 7)
    assert EngineProfile.from_json(custom.to_json()) == custom


@pytest.mark.parametrize(
    ("batch", "seq_len", "message"),
    [
        ("4:2:8", None, r"--batch 4:2:8: need MIN <= OPT <= MAX"),
        ("0:1:2", None, r"--batch 0:1:2: the minimum must be at least 1"),
        ("1:2", None, r"--batch '1:2': give MIN:OPT:MAX"),
        ("a:b:c", None, r"--batch 'a:b:c': give MIN:OPT:MAX"),
        (None, "1:40:9999", r"--seq-len 1:40:9999: the maximum 9999 exceeds this model's limit of \d+"),
        (None, "8:4:16", r"--seq-len 8:4:16: need MIN <= OPT <= MAX"),
    ],
)
def test_bad_profiles_are_refused(tiny_export: Path, batch: str | None, seq_len: str | None, message: str) -> None:
    config = read_manifest(tiny_export / "itm").config
    with pytest.raises(BtDeployError, match=message):
        derive_profile(HEADS["itm"], config, batch, seq_len)


def test_the_base_text_limit_is_512(tiny_export: Path) -> None:
    from btdeploy.model.configs import build_config

    config = build_config({})  # the transformers defaults: base size
    assert max_text_length(config) == 512
    assert derive_profile(HEADS["itm"], config).text_length == ShapeRange(1, 40, 512)
    with pytest.raises(BtDeployError, match="exceeds this model's limit of 512"):
        derive_profile(HEADS["itm"], config, seq_len="1:40:513")


def test_shapes_outside_the_profile_are_refused_before_tensorrt(tiny_export: Path) -> None:
    profile = _profile(tiny_export)
    size = profile.image_size
    fine = {"input_ids": (32, 4), "attention_mask": (32, 4), "pixel_values": (32, 3, size, size)}
    profile.check_feeds(fine)  # the maximum batch is inside
    with pytest.raises(BtDeployError, match=r"batch 33 is outside the engine's profile 1..32: .* --batch 1:8:33"):
        profile.check_feeds({**fine, "input_ids": (33, 4), "pixel_values": (33, 3, size, size)})
    too_long = profile.text_length.max + 1
    with pytest.raises(BtDeployError, match=f"text length {too_long} is outside the engine's profile"):
        profile.check_feeds({**fine, "input_ids": (2, too_long)})
    with pytest.raises(BtDeployError, match=f"this engine takes 3x{size}x{size} images"):
        profile.check_feeds({**fine, "pixel_values": (32, 3, size + 1, size + 1)})


def _record(profile: EngineProfile, version: str = "10.14.1", capability: tuple[int, int] = (9, 0)) -> EngineRecord:
    return EngineRecord(
        precision="fp16",
        tensorrt_version=version,
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=capability,
        onnx_file="model.trt.fp16.onnx",
        onnx_sha256="0" * 64,
        profile=profile.to_json(),
    )


def test_engine_names_carry_precision_version_and_architecture() -> None:
    assert engine_file("fp16", "10.14.1", (9, 0)) == "engine.fp16.10.14.1.sm90.plan"
    assert engine_file("int8", "11.0.0", (8, 9)) == "engine.int8.11.0.0.sm89.plan"
    assert record_file(Path("x/engine.int8.11.0.0.sm89.plan")) == Path("x/engine.int8.11.0.0.sm89.json")


def test_engine_records_round_trip_and_refuse_other_machines(tiny_export: Path, tmp_path: Path) -> None:
    profile = _profile(tiny_export)
    record = _record(profile)
    path = tmp_path / "engine.fp16.10.14.1.sm90.json"
    record.write(path)
    loaded = EngineRecord.read(path)
    assert loaded == record and loaded.engine_profile == profile
    check_compatible(loaded, "10.14.1", "NVIDIA H100 PCIe", (9, 0))  # same architecture, other board: fine
    with pytest.raises(BtDeployError, match="built with TensorRT 10.14.1, this machine runs 11.0.0: rebuild"):
        check_compatible(loaded, "11.0.0", "NVIDIA H100 PCIe", (9, 0))
    with pytest.raises(BtDeployError, match=r"built for NVIDIA H100 80GB HBM3 \(sm90\), this GPU is L4 \(sm89\)"):
        check_compatible(loaded, "10.14.1", "L4", (8, 9))
    path.write_text("{not json")
    with pytest.raises(BtDeployError, match="is missing or damaged"):
        EngineRecord.read(path)


def test_find_engine_names_the_build_command_or_the_mismatch(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(BtDeployError, match=r"engine.fp16.10.14.1.sm90.plan does not exist: run btdeploy build"):
        find_engine(tmp_path, "fp16", "10.14.1", (9, 0))
    other = tmp_path / engine_file("fp16", "10.13.0", (9, 0))
    other.write_bytes(b"engine bytes")
    _record(_profile(tiny_export), version="10.13.0").write(record_file(other))
    with pytest.raises(BtDeployError, match="built with TensorRT 10.13.0, this machine runs 10.14.1"):
        find_engine(tmp_path, "fp16", "10.14.1", (9, 0))
    assert find_engine(tmp_path, "fp16", "10.13.0", (9, 0)) == other


def test_without_tensorrt_build_and_backend_say_what_to_install(
    tiny_export: Path, no_tensorrt: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from btdeploy.backends.tensorrt.build import build_engine

    # A GPU machine without TensorRT: the missing install is the reason (without a GPU, that comes first).
    monkeypatch.setattr(tensorrt_env, "gpu", lambda: ("Fake GPU", (9, 0)))
    with pytest.raises(BtDeployError, match=r"TensorRT is not installed: pip install 'tensorrt>=10.14' on Linux"):
        build_engine(tiny_export / "itm", "fp16")
    with pytest.raises(BtDeployError, match="TensorRT is not installed"):
        btdeploy.load(tiny_export, head="itm", backend="tensorrt", precision="int8")
    assert main(["build", str(tiny_export), "--precision", "int8", "--heads", "itm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("btdeploy: error: TensorRT is not installed")
    with pytest.raises(BtDeployError, match="cannot run int8-dynamic trt graphs: it runs fp16 trt, int8 trt"):
        btdeploy.load(tiny_export, head="itm", backend="tensorrt", precision="int8-dynamic")


def test_an_old_or_broken_tensorrt_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorrt_env, "tensorrt_version", lambda: "8.6.1")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(BtDeployError, match=r"TensorRT 8.6.1 is older than any graph btdeploy writes \(trt-compat"):
        tensorrt_env.require_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    assert tensorrt_env.require_tensorrt().__version__ == "10.3.0"  # JetPack 6: trt-compat graphs
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what `import` does with a stub that failed
    with pytest.raises(BtDeployError, match="TensorRT is installed but does not import"):
        tensorrt_env.require_tensorrt()


def test_without_a_gpu_tensorrt_is_refused_with_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorrt_env, "gpu", lambda: None)
    with pytest.raises(BtDeployError, match="TensorRT needs an NVIDIA GPU .* use ONNX Runtime"):
        tensorrt_env.require_gpu()


def test_build_refuses_bad_arguments_before_anything_else(tiny_export: Path) -> None:
    from btdeploy.backends.tensorrt.build import build_engine

    with pytest.raises(BtDeployError, match="TensorRT engines are fp16, int8"):
        build_engine(tiny_export / "itm", "int8-dynamic")
    with pytest.raises(BtDeployError, match="--workspace 0"):
        build_engine(tiny_export / "itm", "fp16", workspace_gb=0)


def test_doctor_lists_versions_artifacts_and_install_commands(tiny_export: Path, no_tensorrt: None) -> None:
    from btdeploy.apps.doctor import doctor_report

    lines, can_build = doctor_report(tiny_export)
    text = "\n".join(lines)
    assert not can_build
    assert "tensorrt         not installed -> pip install 'tensorrt>=10.14'" in text
    assert "onnxruntime-gpu  1." in text and "CPUExecutionProvider" in text
    assert "TensorRT build and run: no" in text
    assert "serve and triton-repo: yes (Ray 2." in text  # the dev install holds every extra
    assert "OpenVINO (run, rank, serve and check with --backend openvino; a peer in bench): yes (20" in text
    from btdeploy.cpu import describe_cpu

    assert f"CPU              {describe_cpu()}" in lines  # INT8 speed depends on the instruction sets
    from importlib import metadata

    assert f"transformers     {metadata.version('transformers')}" in lines  # the reference model's code
    for head in HEADS:
        assert any(line.split()[0] == head and "model.onnx" in line for line in lines if line.startswith("  "))


def test_doctor_on_a_gpu_machine_with_the_cpu_onnxruntime_and_no_modelopt(
    monkeypatch: pytest.MonkeyPatch, no_tensorrt: None
) -> None:
    """A GPU machine's image may hold the CPU build of onnxruntime and no Model Optimizer: doctor
    says what that costs (no ONNX Runtime CUDA, no quantize) and how to mend it."""
    import onnxruntime

    from btdeploy.apps import doctor

    monkeypatch.setattr(tensorrt_env, "gpu", lambda: ("NVIDIA H200", (9, 0)))
    versions = {"torch": "2.11.0", "onnxruntime": "1.30.0"}
    monkeypatch.setattr(doctor, "package_version", lambda name: versions.get(name))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    lines, can_build = doctor.doctor_report()
    text = "\n".join(lines)
    assert not can_build
    assert "GPU              NVIDIA H200 (compute capability 9.0)" in text
    assert "onnxruntime 1.30.0 (CPU only) is -> pip uninstall -y onnxruntime && pip install onnxruntime-gpu" in text
    assert "ONNX Runtime CUDA: no -> pip install onnxruntime-gpu" in text
    assert "quantize: no (needs nvidia-modelopt)" in text
    assert "TensorRT build and run: no -> pip install 'tensorrt>=10.14'" in text
    assert "  serve and triton-repo: no -> pip install 'btdeploy[serve]'" in lines  # the extras not installed
    openvino = "  OpenVINO (run, rank, serve and check with --backend openvino; a peer in bench)"
    assert f"{openvino}: no -> pip install 'btdeploy[peers]'" in lines


def test_doctor_on_an_aarch64_gpu_machine_takes_the_cpu_onnxruntime_as_installed(
    monkeypatch: pytest.MonkeyPatch, no_tensorrt: None
) -> None:
    """On aarch64 (a Jetson, a Grace server) pyproject.toml installs the CPU onnxruntime, since PyPI
    has no onnxruntime-gpu 1.24 there: doctor must not tell the user to swap it for one."""
    import platform

    import onnxruntime

    from btdeploy.apps import doctor

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(tensorrt_env, "gpu", lambda: ("NVIDIA Thor", (11, 0)))
    versions = {"torch": "2.13.0", "onnxruntime": "1.24.4", "nvidia-modelopt": "0.47.0"}
    monkeypatch.setattr(doctor, "package_version", lambda name: versions.get(name))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    text = "\n".join(doctor.doctor_report()[0])
    assert "onnxruntime      1.24.4 (the CPU package this platform installs" in text
    assert "pip uninstall" not in text and "pip install onnxruntime-gpu" not in text
    assert "ONNX Runtime CUDA: no (PyPI has no onnxruntime-gpu 1.24 for this platform" in text
    versions.pop("onnxruntime")
    assert (
        "onnxruntime      not installed -> pip install onnxruntime (never beside onnxruntime-gpu)"
        in (doctor.doctor_report()[0])
    )


def test_doctor_says_whether_the_reference_runs_bf16_on_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from btdeploy.apps import doctor

    monkeypatch.setattr(doctor, "native_bf16", lambda: ["avx512_bf16"])
    assert "  bf16 on the CPU (the PyTorch reference, OpenVINO): yes (avx512_bf16)" in doctor.doctor_report()[0]
    monkeypatch.setattr(doctor, "native_bf16", lambda: [])
    refused = "  bf16 on the CPU (the PyTorch reference, OpenVINO): no (needs avx512_bf16 or amx_bf16; emulated"
    assert any(line.startswith(refused) for line in doctor.doctor_report()[0])


def test_exact_integer_sums_are_read_from_the_cpu_flags(tmp_path: Path) -> None:
    from btdeploy.cpu import exact_integer_sums

    zen3 = tmp_path / "zen3"
    zen3.write_text("model name\t: AMD EPYC 7763\nflags\t\t: fpu sse2 avx avx2 fma f16c\n")
    vnni = tmp_path / "vnni"
    vnni.write_text("model name\t: AMD EPYC 9654\nflags\t\t: avx avx2 fma avx512f avx512_vnni\n")
    assert exact_integer_sums(zen3) == [] and exact_integer_sums(vnni) == ["avx512_vnni"]


def test_doctor_says_what_int8_sums_this_cpu_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from btdeploy.apps import doctor

    monkeypatch.setattr(doctor, "exact_integer_sums", lambda: ["avx512_vnni"])
    line = "  INT8 on ONNX Runtime's CPU kernels (the ort int8 graphs): yes, every product summed in 32 bits"
    assert f"{line} (avx512_vnni)" in doctor.doctor_report()[0]
    monkeypatch.setattr(doctor, "exact_integer_sums", lambda: [])
    saturating = [line for line in doctor.doctor_report()[0] if "saturating 16-bit" in line]
    assert len(saturating) == 1 and "summed in 32 bits as a VNNI machine does" in saturating[0]  # by default
    assert "btdeploy check DIR --flavour ort --precision int8 --no-exact-sums" in saturating[0]  # the faster way


def test_doctor_says_why_a_listed_cuda_provider_does_not_start(
    monkeypatch: pytest.MonkeyPatch, no_tensorrt: None
) -> None:
    import onnxruntime

    from btdeploy.apps import doctor

    monkeypatch.setattr(tensorrt_env, "gpu", lambda: ("NVIDIA H200", (9, 0)))
    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: listed)
    reason = "ONNX Runtime could not start CUDAExecutionProvider here (libcublasLt.so.12: cannot open shared object)"
    monkeypatch.setattr(doctor, "start_problem", lambda provider: reason)
    assert f"  ONNX Runtime CUDA: no -> {reason}" in doctor.doctor_report()[0]
    monkeypatch.setattr(doctor, "start_problem", lambda provider: None)
    assert "  ONNX Runtime CUDA: yes" in doctor.doctor_report()[0]


def test_versions_from_a_checkout_beside_the_cpu_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded versions (manifests, bench reports) name what runs: the checkout's btdeploy version
    and the CPU onnxruntime where onnxruntime-gpu is absent, not two 'not installed'."""
    import btdeploy
    from btdeploy.artifacts import manifest

    versions = {"torch": "2.11.0", "onnxruntime": "1.30.0"}
    monkeypatch.setattr(manifest, "package_version", lambda name: versions.get(name))
    recorded = manifest.tool_versions()
    assert recorded["btdeploy"] == btdeploy.__version__ and recorded["onnxruntime"] == "1.30.0"
    assert "onnxruntime-gpu" not in recorded and recorded["onnx"] == "not installed"


def test_doctor_lists_split_graphs(tiny_export: Path, tmp_path: Path) -> None:
    import shutil

    from btdeploy.apps.doctor import doctor_report

    folder = tmp_path / "out" / "itm"
    shutil.copytree(tiny_export / "itm", folder)
    for stem in ("text", "vision", "fusion"):
        (folder / f"{stem}.onnx").write_bytes(b"stands in for a split graph")
    lines, _ = doctor_report(folder.parent)
    assert "        split graphs {text,vision,fusion}: .onnx" in lines
    (folder / "fusion.ort.onnx").write_bytes(b"only fusion has been optimized")
    lines, _ = doctor_report(folder.parent)
    assert "        split graphs text: text.onnx" in lines
    assert "        split graphs fusion: fusion.onnx, fusion.ort.onnx" in lines


def test_doctor_runs_from_the_command_line(tiny_export: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "btdeploy.cli", "doctor", str(tiny_export)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "can run here:" in result.stdout and "btdeploy artifacts in" in result.stdout


def test_doctor_gives_polygraphy_commands_that_polygraphy_accepts(
    tiny_export: Path, tmp_path: Path, no_tensorrt: None
) -> None:
    import shutil
    import subprocess

    from btdeploy.apps.doctor import doctor_report

    folder = tmp_path / "out"
    shutil.copytree(tiny_export / "itm", folder / "itm")
    (folder / "itm" / "model.trt-compat.fp16.onnx").write_bytes(b"stands in for a quantized graph")
    # Where TensorRT cannot run, one line says how to get the commands instead of a page of them.
    lines, _ = doctor_report(folder)
    assert not [line for line in lines if "polygraphy run" in line]
    assert f"1 TensorRT graph(s) here: `btdeploy doctor {folder} --polygraphy` prints" in "\n".join(lines)
    lines, _ = doctor_report(folder, polygraphy=True)
    commands = [line.strip() for line in lines if line.strip().startswith("polygraphy run")]
    assert len(commands) == 1 and "model.trt-compat.fp16.onnx --trt --strongly-typed --onnxrt" in commands[0]
    assert "--trt-opt-shapes input_ids:[8,40] attention_mask:[8,40] pixel_values:[8,3,64,64]" in commands[0]
    usage = subprocess.run(["polygraphy", "run", "--help"], capture_output=True, text=True, check=True).stdout
    flags = [word for word in commands[0].split() if word.startswith("--")]
    assert [flag for flag in flags if flag not in usage] == []


_STOP_DURING_A_BUILD = """
import signal, threading, types
from btdeploy.backends.tensorrt.build import _progress_monitor
from btdeploy.signals import Terminated, interrupts_deferred, sigterm_raises

class IProgressMonitor:  # TensorRT's base class, standing in
    def __init__(self):
        pass

seen = []
with sigterm_raises():
    try:
        with interrupts_deferred() as stops:
            monitor = _progress_monitor(types.SimpleNamespace(IProgressMonitor=IProgressMonitor), stops)
            seen.append(monitor.step_complete("tactics", 0))

            def builder_thread():
                # SIGTERM lands on one of TensorRT's threads while the main thread waits in native
                # code (here: join), so Python's handler cannot run until the build returns
                signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
                seen.append(monitor.step_complete("tactics", 1))

            worker = threading.Thread(target=builder_thread)
            worker.start()
            worker.join()
            seen.append("build returned")
    except Terminated:
        seen.append("Terminated")
print(seen)
"""


def test_a_stop_during_an_engine_build_cancels_it_at_the_next_step_then_is_raised() -> None:
    """The monitor answers False (TensorRT's cancel) as soon as SIGTERM arrives, from whichever
    thread asks, with no exception inside TensorRT's callback; the stop is raised after the build
    returns, before anything is written."""
    done = subprocess.run([sys.executable, "-c", _STOP_DURING_A_BUILD], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == str([True, False, "build returned", "Terminated"]), done.stderr[-2000:]
