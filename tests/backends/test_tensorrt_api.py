"""Every TensorRT name btdeploy's build and runtime code uses exists in every TensorRT release it
supports, checked against the names read from each release's real Python bindings."""

from __future__ import annotations

import pytest

from btdeploy.backends.tensorrt.api_names import (
    SUPPORTED_RELEASES,
    btdeploy_names,
    missing_names,
    names_used,
    release_names,
)


def test_the_code_reads_the_tensorrt_names_it_should() -> None:
    used = btdeploy_names()
    # A sample of what each module must be seen to use, so the scan cannot silently go blind.
    assert {"create_network", "build_serialized_network", "STRONGLY_TYPED", "IProgressMonitor"} <= used["build.py"]
    assert {"execute_async_v3", "set_input_shape", "set_tensor_address", "get_tensor_mode"} <= used["runner.py"]
    assert sum(len(names) for names in used.values()) >= 40


@pytest.mark.parametrize("release", SUPPORTED_RELEASES)
def test_every_name_exists_in_every_supported_release(release: str) -> None:
    assert len(release_names(release)) > 3000
    for module, names in btdeploy_names().items():
        assert missing_names(names, release) == [], f"{module} uses names TensorRT {release} does not define"


def test_a_name_that_tensorrt_11_removed_is_caught() -> None:
    # TensorRT 11 removed implicit precision flags and the INT8 calibrator; a planted call of them
    # passes on 10.x and fails on 11.4.
    planted = names_used(
        "config.int8_calibrator = calibrator\n"
        "config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)\n"
        "network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))\n"
    )
    assert {"int8_calibrator", "OBEY_PRECISION_CONSTRAINTS", "EXPLICIT_BATCH"} <= planted
    assert missing_names(planted, "10.14.1.48.post1") == []
    assert missing_names(planted, "11.4.0.106") == ["EXPLICIT_BATCH", "OBEY_PRECISION_CONSTRAINTS", "int8_calibrator"]
