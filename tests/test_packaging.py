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


def test_registry_metadata_follows_the_registry_spec():
    # https://docs.comfy.org/registry/specifications; ComfyUI 0.8's comfy_config/types.py reads the same fields
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    for c in project.get("classifiers", []):
        if c.startswith("Environment :: "):
            assert c[len("Environment :: "):] in {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc",
                                                  "NPU :: Huawei Ascend", "GPU :: Apple Metal"}, c


def test_registry_icon_is_a_url_to_a_small_square_image_in_the_repository():
    from PIL import Image
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    raw = repo.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy["Icon"].startswith(raw), f"Icon must be a URL into this repository ({raw}...)"
    path = ROOT / comfy["Icon"][len(raw):]
    assert path.is_file(), f"{path} is not in the repository"
    with Image.open(path) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.width == im.height <= 400   # spec: at most 800x400
