"""`python -m fcmae.tools.env`: the bug-report environment summary, with and without optional packages."""

import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from fcmae.tools import env

REPO = Path(__file__).resolve().parents[2]
OPTIONAL_MODULES = [module for _, module, _ in env.OPTIONAL]


def report_dict(lines):
    return dict(lines)


def fake_distribution(root: Path, module: str, dist_name: str, version: str) -> None:
    """An importable package `module` under root plus its dist-info (name, version)."""
    package = root.joinpath(*module.split("."))
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('fcmae.tools.env must not import optional packages')\n")
    info = root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")


@pytest.mark.slow
def test_command_prints_the_report():
    result = subprocess.run([sys.executable, "-m", "fcmae.tools.env"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label, value in [("Python", platform.python_version()), ("torch", torch.__version__),
                         ("torchvision", torchvision.__version__.split("+")[0]), ("timm", timm.__version__)]:
        assert any(line.startswith(f"{label}:") and value in line for line in out.splitlines()), (label, out)
    for label in ["fcmae", "torch CUDA", "torch cuDNN", "GPUs", "MinkowskiEngine", "DALI", "transformers",
                  "safetensors", "tifffile", "TorchCodec", "image decoder"]:
        assert any(line.startswith(f"{label}:") for line in out.splitlines()), (label, out)
    assert str(REPO) in out  # which checkout's code ran


def test_command_refuses_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        env.main(["--json"])
    assert exit_info.value.code == 2
    assert "takes no arguments" in capsys.readouterr().err


def test_absent_optional_packages_are_reported(monkeypatch):
    for module in OPTIONAL_MODULES:
        monkeypatch.setitem(sys.modules, module, None)  # what find_spec sees for a blocked import
    report = report_dict(env.collect())
    for label, _, _ in env.OPTIONAL:
        assert report[label] == "not installed", (label, report[label])
    assert report["torch"] == torch.__version__


def test_present_optional_packages_show_their_versions_without_being_imported(monkeypatch, tmp_path):
    for module in OPTIONAL_MODULES:
        monkeypatch.delitem(sys.modules, module, raising=False)
    fake_distribution(tmp_path, "MinkowskiEngine", "MinkowskiEngine", "0.5.4")
    fake_distribution(tmp_path, "nvidia.dali", "nvidia-dali-cuda120", "1.99.0")
    fake_distribution(tmp_path, "transformers", "transformers", "9.8.7")
    # With torch's CUDA wheels `nvidia` is a regular package in site-packages (DALI installs
    # into it); point it at the fake one.
    nvidia = types.ModuleType("nvidia")
    nvidia.__path__ = [str(tmp_path / "nvidia")]
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.syspath_prepend(str(tmp_path))
    report = report_dict(env.collect())
    assert report["MinkowskiEngine"] == "0.5.4"
    assert report["DALI"] == "1.99.0 (nvidia-dali-cuda120)"
    assert report["transformers"] == "9.8.7"
    assert "MinkowskiEngine" not in sys.modules and "nvidia.dali" not in sys.modules


def test_broken_optional_packages_do_not_crash(monkeypatch, tmp_path):
    # A module object without a spec makes find_spec raise ValueError.
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    # A package present without metadata (copied in by hand) has no known version.
    (tmp_path / "MinkowskiEngine").mkdir()
    (tmp_path / "MinkowskiEngine" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "MinkowskiEngine", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    report = report_dict(env.collect())
    assert report["transformers"].startswith("error: ValueError"), report["transformers"]
    assert report["MinkowskiEngine"] == "present, version unknown (no package metadata)"
    text = env.format_report(env.collect())
    assert "transformers:" in text and "tifffile:" in text


def test_gpu_lines_name_memory_capability_and_bf16(monkeypatch):
    props = types.SimpleNamespace(name="Fake GPU", total_memory=80 * 2**30, major=9, minor=0)
    fake_cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                                      get_device_properties=lambda index: props,
                                      device=lambda index: torch.cuda.device(-1),  # a no-op context
                                      is_bf16_supported=lambda: True)
    lines = env.gpu_lines(types.SimpleNamespace(cuda=fake_cuda))
    assert lines == [("GPUs", "2"), ("GPU 0", "Fake GPU, 80.0 GiB, capability 9.0, bf16 yes"),
                     ("GPU 1", "Fake GPU, 80.0 GiB, capability 9.0, bf16 yes")]


def test_gpu_errors_are_reported_not_raised():
    def broken():
        raise RuntimeError("CUDA driver initialization failed\nmore detail")

    lines = env.gpu_lines(types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=broken)))
    assert lines == [("GPUs", "error: RuntimeError: CUDA driver initialization failed")]


def test_broken_torch_still_prints_a_report(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    lines = env.torch_lines()
    assert lines[0][0] == "torch" and lines[0][1].startswith("error: ModuleNotFoundError")
    assert "timm" in env.format_report(env.collect())
