"""The package skeleton: import rules, version, tokenizer, tiny model kit, segment-anything import."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

from conftest import ROOT, run_python
from protobooth.engine.compat import text_tensors

COMFYUI_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "nodes", "server",
                   "execution", "latent_preview", "node_helpers"}


def _imported_top_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_engine_never_imports_comfyui():
    offenders = {}
    for path in sorted((ROOT / "engine").rglob("*.py")):
        bad = _imported_top_modules(path) & COMFYUI_MODULES
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"engine/ must not import ComfyUI: {offenders}"


def test_import_outside_comfyui_is_light_and_registers_nothing():
    result = run_python(
        "import sys, protobooth;"
        "print(protobooth.__version__, len(protobooth.NODE_CLASS_MAPPINGS), protobooth.WEB_DIRECTORY,"
        " 'torch' in sys.modules, any(m.split('.')[0] == 'comfy' for m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    version, nodes, web, torch_loaded, comfy_loaded = result.stdout.split()
    assert (nodes, web, torch_loaded, comfy_loaded) == ("0", "./js", "False", "False")


def test_version_matches_pyproject():
    from protobooth import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["version"] == __version__
    assert {"PublisherId", "DisplayName", "Icon"} <= set(project["tool"]["comfy"])


def test_every_package_folder_is_in_the_distribution():
    """A pip install (not editable) ships only the packages pyproject lists: a new folder must be there."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"protobooth." + ".".join(path.parent.relative_to(ROOT).parts) for base in ("engine", "nodes")
               for path in (ROOT / base).rglob("__init__.py")}
    assert folders <= listed, sorted(folders - listed)


def test_requirements_never_pin_torch():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name = line.split("#")[0].strip().split("=")[0].split(">")[0].split("<")[0].strip().lower()
        assert name not in {"torch", "torchvision", "torchaudio"}, line


def _requirements(name: str) -> dict:
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return {r.name.lower(): r for r in map(Requirement, (line for line in lines if line and not line.startswith("-r")))}


def test_both_pinned_sets_sit_at_the_ends_of_the_supported_ranges():
    """requirements.txt (= pyproject's dependencies) gives the ranges; requirements-min.txt pins each lower end, which
    `make test-min` runs the suite on, and requirements-dev.txt pins versions inside them, which `make test` runs on."""
    supported = _requirements("requirements.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    from packaging.requirements import Requirement
    from packaging.version import Version

    assert sorted(map(str, supported.values())) == sorted(str(Requirement(line)) for line in project)
    lowest, newest = _requirements("requirements-min.txt"), _requirements("requirements-dev.txt")
    for name, requirement in supported.items():
        floor = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==")]
        assert floor, f"{name} needs a lowest supported version in requirements.txt"
        [pinned_low] = [spec.version for spec in lowest[name].specifier]
        assert Version(pinned_low) == Version(floor[0]), (name, pinned_low, floor)
        [pinned_new] = [spec.version for spec in newest[name].specifier]
        assert requirement.specifier.contains(pinned_new), (name, pinned_new, str(requirement))


def test_console_script_help_and_version():
    script = Path(sys.executable).parent / "protobooth"
    assert script.exists(), "the `protobooth` console script is missing: run `pip install -e .`"
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip().startswith("protobooth 0."), version
    help_ = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "usage: protobooth" in help_.stdout


def test_tokenizer_matches_openai_clip():
    from protobooth.engine.text.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    assert tokenizer("a photo of a sks dog").input_ids == [49406, 320, 1125, 539, 320, 48136, 1929, 49407]
    assert len(tokenizer) == 49408
    padded = tokenizer("a photo of a sks dog", padding="max_length", truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 77)
    assert padded.input_ids[0, 8:].eq(49407).all()
    long = tokenizer(" ".join(["dog"] * 100), padding="max_length", truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 49407


def test_tiny_models_are_seeded_and_run():
    from protobooth.engine.models import tiny

    a, b, c = tiny.tiny_model(0), tiny.tiny_model(0), tiny.tiny_model(1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    for (name, x), y in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(x, y), name
    with torch.no_grad():
        ids = a.tokenizer(["a photo of a dog"], padding="max_length", return_tensors="pt").input_ids
        states = a.text_encoder(ids)[0]
        latents = a.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        noise = a.unet(latents, 10, encoder_hidden_states=states).sample
    assert states.shape == (1, 77, 32) and latents.shape == (1, 4, 8, 8) and noise.shape == latents.shape
    assert torch.isfinite(noise).all()

    clip = tiny.tiny_clip(a.text_encoder)
    for key, value in text_tensors(a.text_encoder).items():
        assert torch.equal(clip.text_model.state_dict()[key], value)
    with torch.no_grad():
        image_features = clip.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
    image_features = getattr(image_features, "pooler_output", image_features)
    assert image_features.shape[-1] == 32


def test_sd2_variant_differs_where_sd2_differs():
    from protobooth.engine.models import tiny

    sd2 = tiny.tiny_model(0, family="sd2", prediction_type="v_prediction")
    assert sd2.unet.config.use_linear_projection and sd2.prediction_type == "v_prediction"
    assert sd2.tokenizer("a dog", padding="max_length").input_ids[4] == 0  # SD2 pads with "!"
    assert sd2.fingerprint != tiny.tiny_model(0).fingerprint


def test_segment_anything_stand_in_is_scoped():
    # transformers and diffusers decide once, on import, whether torchvision exists: importing them only after
    # segment-anything is what would show a stand-in left behind in sys.modules.
    code = """
import sys, numpy as np
from protobooth.engine.segment.sam_import import import_segment_anything
sam_module = import_segment_anything()
assert not {"transformers", "diffusers"} & set(sys.modules), "imported before the check could see a leak"
from transformers.utils import is_torchvision_available as transformers_sees
from diffusers.utils import is_torchvision_available as diffusers_sees
from kit.sam import tiny_sam
predictor = sam_module.SamPredictor(tiny_sam())
predictor.set_image(np.zeros((48, 64, 3), dtype=np.uint8))
masks, scores, _ = predictor.predict(box=np.array([8, 8, 40, 40]), multimask_output=True)
print(transformers_sees(), diffusers_sees(), any(m.split('.')[0] == 'torchvision' for m in sys.modules), masks.shape)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(None, 3)[:3] == ["False", "False", "False"]
    assert "(3, 48, 64)" in result.stdout
