"""The swaps the export and the quantize steps make in other libraries' modules are undone on every way out."""

from __future__ import annotations

import types

import onnx
import pytest

from btdeploy.quantize.onnx_stand_in import OnnxModuleSeenBy
from btdeploy.swaps import replaced


class _Base:
    def step(self) -> str:
        return "base"


class _Child(_Base):
    def own(self) -> str:
        return "child"


def test_replacements_hold_inside_and_originals_return_after() -> None:
    module = types.SimpleNamespace(read=len)
    with replaced((module, "read", max), (_Child, "own", lambda self: "swapped")):
        assert module.read is max
        assert _Child().own() == "swapped"
    assert module.read is len
    assert _Child().own() == "child"


def test_an_error_inside_still_puts_everything_back() -> None:
    module = types.SimpleNamespace(read=len, write=print)
    with pytest.raises(KeyError), replaced((module, "read", max), (module, "write", min)):
        raise KeyError("inside")
    assert (module.read, module.write) == (len, print)


def test_an_inherited_method_swapped_on_a_subclass_is_inherited_again_after() -> None:
    with replaced((_Child, "step", lambda self: "swapped")):
        assert _Child().step() == "swapped"
        assert _Base().step() == "base"
    assert "step" not in vars(_Child)
    # A later change to the base class reaches the subclass again.
    with replaced((_Base, "step", lambda self: "changed base")):
        assert _Child().step() == "changed base"


def test_the_same_attribute_swapped_twice_gets_its_first_value_back() -> None:
    module = types.SimpleNamespace(read=len)
    with replaced((module, "read", max), (module, "read", min)):
        assert module.read is min
    assert module.read is len


def test_a_stand_in_for_onnx_keeps_its_own_and_lends_the_rest() -> None:
    class Saving(OnnxModuleSeenBy):
        def save_model(self, *args: object) -> str:
            return "kept"

    stand_in = Saving()
    assert stand_in.save_model() == "kept"
    assert stand_in.load_model is onnx.load_model
    assert stand_in.helper is onnx.helper
    with pytest.raises(AttributeError):
        stand_in.no_such_function  # noqa: B018
