"""Run an exported head behind the transformers calling convention (whole graph or split towers)."""

from btdeploy.runtime.runtime import Features, HeadOutput, Runtime, SplitRuntime, find_head, load

__all__ = ["Features", "HeadOutput", "Runtime", "SplitRuntime", "find_head", "load"]
