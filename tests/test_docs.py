"""The docs stay true to the repository: the README fits a newcomer's first read, every relative link and
anchor resolves, every config key and every output column is documented, and every test a doc names
exists. (The recipes themselves are executed in tests/test_outputs.py.)"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from configs import schema
from transforms import tables

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_LIMIT = 12_000  # characters (issue 21): the rest lives in docs/
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(path: Path) -> str:
    """A markdown file without its fenced code blocks (their brackets are code, not links)."""
    return FENCE.sub("", path.read_text())


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation but - and _ dropped, spaces
    to hyphens; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_the_readme_fits_a_first_read():
    assert len((ROOT / "README.md").read_text()) <= README_LIMIT  # as `wc -m README.md` counts


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_anchor_that_exist(doc):
    broken = []
    for target in LINK.findall(prose(doc)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.relative_to(ROOT)}")
    assert broken == []


def schema_keys(cls, prefix: str = "") -> list[str]:
    """Every key of the config schema, dotted as docs/CONFIG.md writes it (``stages[i].threshold``,
    ``models.<name>.arch``, ``decode.max_pixels``)."""
    nested = {schema.StageConfig: "stages[i].", schema.ModelDef: "models.<name>.",
              schema.VideoConfig: "video.", schema.CalibrationInfo: "calibration."}
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        inner = {"stages": schema.StageConfig, "models": schema.ModelDef, "video": schema.VideoConfig,
                 "calibration": schema.CalibrationInfo, "decode": type(schema.CascadeConfig().decode)}.get(f.name)
        if inner is not None and not prefix:
            keys += schema_keys(inner, nested.get(inner, f"{f.name}."))
    return keys


def test_every_config_key_is_documented():
    documented = set(re.findall(r"`([^`]+)`", prose(ROOT / "docs" / "CONFIG.md")))
    keys = schema_keys(schema.CascadeConfig)
    assert {"stages[i].threshold", "models.<name>.arch", "decode.read_timeout_s", "video.every_n",
            "calibration.expected_exit_ratios"} <= set(keys)
    assert [key for key in keys if key not in documented] == []


def test_every_output_column_is_documented():
    text = prose(ROOT / "docs" / "OUTPUTS.md")
    documented = set(re.findall(r"`([^`]+)`", text))
    documented |= {name.strip("` ") for cell in re.findall(r"^\| *([^|]+?) *\|", text, re.M)
                   for name in cell.split(",")}
    columns = {c for t in (tables.PREDICTIONS, tables.FRAME_PREDICTIONS, tables.VIDEO_PREDICTIONS,
                           tables.DEAD_LETTER, tables.EXIT_STATS) for c in t.schema.names}
    assert sorted(columns - documented) == []


def test_every_test_a_doc_names_exists():
    defined = {name for f in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    named = {name for doc in DOCS for name in re.findall(r"\b(test_\w+)", doc.read_text())
             if not (ROOT / "tests" / f"{name}.py").exists()}  # a test module's name is not a test's
    assert sorted(named - defined) == []
