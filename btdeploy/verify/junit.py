"""Parity rows as JUnit XML, the test report CI systems read (GitLab, Jenkins, Azure Pipelines,
GitHub's test-report actions): a release gate's parity check shows there as test cases, one per
head and output, with each floor an output missed as its failure message (and a ranking row's
retrieval line, top-1 as the reference and Recall@K, as its output where it passes).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import write_bytes
from btdeploy.verify.parity import ParityRow, describe_retrieval, format_rows, shortfalls


def junit_suite(name: str, rows: list[ParityRow], report: dict[str, Any]) -> ET.Element:
    """One suite: a graph (or engine) checked against the reference, a test case per row; the
    facts of its JSON `report` (`verify.check.report_data`), without the rows, as properties."""
    failed = [row for row in rows if not row.passed]
    suite = ET.Element("testsuite", name=name, tests=str(len(rows)), failures=str(len(failed)), errors="0", skipped="0")
    listed = ET.SubElement(suite, "properties")
    for key, value in _properties(report).items():
        if value is not None:  # no flavour (the plain export), no GPU
            ET.SubElement(listed, "property", name=key, value=str(value))
    for row in rows:
        case = ET.SubElement(suite, "testcase", classname=f"btdeploy.{row.head}", name=f"{row.output} [{name}]")
        if not row.passed:
            failure = ET.SubElement(
                case, "failure", type="parity", message="; ".join(shortfalls(row.stats, row.tolerance))
            )
            graphs = "".join(f"\n{file} sha256 {digest}" for file, digest in row.graphs.items())
            reference = "".join(f"\nreference {key} {value}" for key, value in row.reference.items())
            failure.text = format_rows([row]) + graphs + reference
        elif row.retrieval is not None:  # a passing ranking row still says what a retrieval user reads
            ET.SubElement(case, "system-out").text = describe_retrieval(row)
    return suite


def _properties(report: dict[str, Any]) -> dict[str, Any]:
    facts = {key: value for key, value in report.items() if key not in ("rows", "versions", "inputs", "options")}
    inputs = {f"inputs.{key}": value for key, value in report["inputs"].items()}
    return facts | inputs | {f"versions.{tool}": version for tool, version in report["versions"].items()}


def write_junit(path: Path, suites: list[ET.Element]) -> None:
    """Every suite in one file, written whole or not at all."""
    root = ET.Element(
        "testsuites",
        name="btdeploy parity",
        tests=str(sum(int(s.get("tests", 0)) for s in suites)),
        failures=str(sum(int(s.get("failures", 0)) for s in suites)),
    )
    root.extend(suites)
    ET.indent(root)
    write_bytes(path, ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n")


__all__ = ["junit_suite", "write_junit"]
