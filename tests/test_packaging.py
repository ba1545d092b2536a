"""Tier 1: packaging metadata stays consistent."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_dependencies_equal_requirements_and_never_torch():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = sorted(meta["project"]["dependencies"])
    reqs = sorted(line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert deps == reqs
    assert not any(re.match(r"torch\b", d) for d in deps)
    assert meta["tool"]["comfy"]["requires-comfyui"].startswith(">=")


def test_node_modules_are_the_only_comfy_importers():
    for path in (ROOT / "attention").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+comfy", text, re.M), path
