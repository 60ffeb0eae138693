"""What a bug report needs: versions of this project and its dependencies, and the GPUs.

    python -m fcmae.tools.env
    fcmae-env

Prints one `name: value` line each for the project, Python, torch (with the
CUDA and cuDNN it was built with), torchvision and timm; whether the optional
packages (MinkowskiEngine, DALI, transformers, safetensors, tifffile,
TorchCodec) are present, with their versions; the library that decodes 16-bit
PNGs and GPU JPEG batches (`image decoder`: TorchCodec, or the deprecated
torchvision decoders, see fcmae.data.decoders); and every visible GPU (name,
memory, compute capability, bf16 support).

Optional packages are looked up without being imported
(`importlib.util.find_spec` for presence, `importlib.metadata` for the
version), so a package that is absent, half-installed or fails to import
yields a line that says so instead of a crash.
"""

import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

Line = Tuple[str, str]

# (label, importable module, distribution name; a trailing "*" matches any
# distribution whose name starts with the rest, e.g. nvidia-dali-cuda120).
REQUIRED = (("torchvision", "torchvision", "torchvision"), ("timm", "timm", "timm"),
            ("webdataset", "webdataset", "webdataset"))
OPTIONAL = (
    ("MinkowskiEngine", "MinkowskiEngine", "MinkowskiEngine"),
    ("DALI", "nvidia.dali", "nvidia-dali*"),
    ("transformers", "transformers", "transformers"),
    ("safetensors", "safetensors", "safetensors"),
    ("tifffile", "tifffile", "tifffile"),
    ("TorchCodec", "torchcodec", "torchcodec"),
)


def _error(exc: BaseException) -> str:
    """One line naming a failure: `error: TypeName: message`."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {message}" if message else f"error: {type(exc).__name__}"


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (case, '-', '_' and '.' alike)."""
    return name.lower().replace("_", "-").replace(".", "-")


def distribution_version(dist_name: str) -> Optional[str]:
    """The installed version of a distribution, or None when it has no metadata.

    Args:
        dist_name: the distribution's name; a trailing "*" accepts the first
            distribution whose name starts with the rest.
    """
    if not dist_name.endswith("*"):
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None
    prefix = _normalise(dist_name[:-1])
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if _normalise(name).startswith(prefix):
            return f"{dist.version} ({name})"
    return None


def package_line(label: str, module: str, dist_name: str) -> Line:
    """`(label, version or 'not installed')` for one package, without importing it.

    Args:
        label: the name printed.
        module: the module whose presence counts (found with find_spec).
        dist_name: the distribution holding its version (see
            `distribution_version`).
    """
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a parent package (e.g. `nvidia`) is absent
        spec = None
    except Exception as exc:  # a broken install: a module without a spec, a failing parent
        return label, _error(exc)
    if spec is None:
        return label, "not installed"
    try:
        version = distribution_version(dist_name)
    except Exception as exc:  # unreadable metadata
        return label, f"present, version unknown ({_error(exc)})"
    return label, version if version is not None else "present, version unknown (no package metadata)"


def project_line() -> Line:
    """This project's version (from the installed metadata) and where its code is."""
    location = Path(__file__).resolve().parents[2]  # the folder that holds fcmae/
    try:
        version = importlib.metadata.version("fcmae")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    return "fcmae", f"{version} (code in {location})"


def torch_lines() -> List[Line]:
    """torch's version, the CUDA and cuDNN it was built with, and every visible GPU."""
    try:
        import torch  # a broken torch must still give a report
    except Exception as exc:  # torch is required, but a report must still print
        return [("torch", _error(exc))]
    lines = [("torch", torch.__version__), ("torch CUDA", torch.version.cuda or "none (CPU build)")]
    if getattr(torch.version, "hip", None):
        lines.append(("torch ROCm", torch.version.hip))
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        lines.append(("torch cuDNN", str(cudnn) if cudnn is not None else "none"))
    except Exception as exc:
        lines.append(("torch cuDNN", _error(exc)))
    lines.append(("CPU threads", f"torch {torch.get_num_threads()}, os {os.cpu_count()}"))
    return lines + gpu_lines(torch)


def gpu_lines(torch) -> List[Line]:
    """One line per visible GPU: name, memory, compute capability, bf16 support."""
    try:
        if not torch.cuda.is_available():
            return [("GPUs", "none (torch.cuda.is_available() is False)")]
        count = torch.cuda.device_count()
        lines = [("GPUs", str(count))]
        for index in range(count):
            props = torch.cuda.get_device_properties(index)
            with torch.cuda.device(index):
                bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
            lines.append((f"GPU {index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                          f"capability {props.major}.{props.minor}, bf16 {bf16}"))
        return lines
    except Exception as exc:  # a driver problem is exactly what a report should show
        return [("GPUs", _error(exc))]


def decoder_line() -> Line:
    """The library fcmae.data.decoders decodes 16-bit PNGs and GPU JPEG batches with, and its version."""
    try:
        from fcmae.data import decoders  # imports torch and TorchCodec: a broken one must still give a report
    except Exception as exc:
        return "image decoder", _error(exc)
    return "image decoder", decoders.decoder_description()


def collect() -> List[Line]:
    """Every line of the report, in order."""
    lines = [project_line(), ("Python", f"{platform.python_version()} ({sys.executable})"),
             ("platform", platform.platform())]
    lines += torch_lines()
    lines += [package_line(*entry) for entry in REQUIRED]
    lines += [package_line(*entry) for entry in OPTIONAL]
    return lines + [decoder_line()]


def format_report(lines: Sequence[Line]) -> str:
    """The lines as aligned `name: value` text."""
    width = max(len(name) for name, _ in lines) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print the report (no arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print(f"error: fcmae-env takes no arguments (got {' '.join(args)})", file=sys.stderr)
        raise SystemExit(2)
    print(format_report(collect()))


if __name__ == "__main__":
    main()
