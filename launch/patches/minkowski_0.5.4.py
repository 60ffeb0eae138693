#!/usr/bin/env python
"""Patch an unpacked MinkowskiEngine 0.5.4 sdist so it builds with a current toolchain.

    python launch/patches/minkowski_0.5.4.py SRC_DIR [--cuda]

Idempotent: an edit already applied is reported and skipped; an edit whose
anchor text is missing (a different ME version) stops with an error, so the
build never silently runs on unpatched sources. Each edit says why it is
needed (docs/MINKOWSKI.md lists them with the failures they fix).
"""

import argparse
import pathlib
import sys

# Thrust headers that ME's CUDA sources use without including them: CUDA >= 12
# (CCCL) no longer pulls them in transitively ("namespace thrust has no member
# device / remove_if / unique / sort_by_key / sequence ...").
THRUST_INCLUDES = """// --- added by launch/patches/minkowski_0.5.4.py: explicit thrust includes (CUDA >= 12)
#include <thrust/copy.h>
#include <thrust/count.h>
#include <thrust/execution_policy.h>
#include <thrust/fill.h>
#include <thrust/reduce.h>
#include <thrust/remove.h>
#include <thrust/scan.h>
#include <thrust/sequence.h>
#include <thrust/sort.h>
#include <thrust/transform.h>
#include <thrust/unique.h>
// --- end of added includes
"""

EMPTY_MAP_OLD = """      return detail::empty_map_functor<coordinate_type, TemplatedAllocator,
                                       CoordinateMapType, kernel_map_type>()();"""
EMPTY_MAP_NEW = """      // patched: cache the empty map and return a reference to the cached
      // copy (upstream returned a reference to a temporary).
      m_kernel_maps[kernel_map_key] =
          detail::empty_map_functor<coordinate_type, TemplatedAllocator,
                                    CoordinateMapType, kernel_map_type>()();
      return m_kernel_maps[kernel_map_key];"""

BLAS_SEARCH_OLD = 'else:\n    # find the default BLAS library\n    import numpy.distutils.system_info as sysinfo\n\n    # Search blas in this order\n    for blas in BLAS_LIST:\n        if "libraries" in sysinfo.get_info(blas):\n            BLAS = blas\n            libraries += sysinfo.get_info(blas)["libraries"]\n            break\n    else:\n        # BLAS not found\n        raise ImportError(\n            \' \\\n\\nBLAS not found from numpy.distutils.system_info.get_info. \\\n\\nPlease specify BLAS with: python setup.py install --blas=openblas" \\\n\\nfor more information, please visit https://github.com/NVIDIA/MinkowskiEngine/wiki/Installation\'\n        )\n\n'
BLAS_SEARCH_NEW = """else:
    # patched: numpy.distutils cannot search for BLAS any more; default to OpenBLAS
    # (Debian/Ubuntu: apt-get install libopenblas-dev). Pass --blas=... to choose.
    BLAS = "openblas"
    libraries.append(BLAS)

"""

# (file, anchor text, replacement, reason, applies to CUDA builds only)
EDITS = [
    (
        "setup.py",
        'run_command("pip", "uninstall", "MinkowskiEngine", "-y")\n',
        "# patched: no `pip uninstall` of whatever pip is first on PATH at import time\n",
        "setup.py ran `pip uninstall MinkowskiEngine` (any pip on PATH) every time it was imported",
        False,
    ),
    (
        "setup.py",
        BLAS_SEARCH_OLD,
        BLAS_SEARCH_NEW,
        "BLAS auto-detection through numpy.distutils fails with setuptools >= 60 (TypeError in "
        "Compiler.__init__) and numpy.distutils is gone on Python >= 3.12: default to OpenBLAS",
        False,
    ),
    (
        "setup.py",
        '        extra_link_args += [f"-Wl,-rpath,{BLAS_LIBRARY_DIRS}"]\n',
        '        extra_link_args += [f"-L{d}" for d in BLAS_LIBRARY_DIRS]\n'
        '        extra_link_args += [f"-Wl,-rpath,{d}" for d in BLAS_LIBRARY_DIRS]\n',
        "--blas_library_dirs formatted a Python list into one linker flag",
        False,
    ),
    (
        "MinkowskiEngine/MinkowskiCoordinateManager.py",
        "from collections import Sequence\n",
        "from collections.abc import Sequence  # patched: removed from collections in Python 3.10\n",
        "`from collections import Sequence` fails on Python >= 3.10",
        False,
    ),
    (
        "MinkowskiEngine/MinkowskiTensorField.py",
        "from collections import Sequence\n",
        "from collections.abc import Sequence  # patched: removed from collections in Python 3.10\n",
        "`from collections import Sequence` fails on Python >= 3.10",
        False,
    ),
    (
        "MinkowskiEngine/MinkowskiCommon.py",
        "from collections import Sequence\n",
        "from collections.abc import Sequence  # patched: removed from collections in Python 3.10\n",
        "`from collections import Sequence` fails on Python >= 3.10",
        False,
    ),
    (
        "MinkowskiEngine/utils/quantization.py",
        "from collections import Sequence\n",
        "from collections.abc import Sequence  # patched: removed from collections in Python 3.10\n",
        "`from collections import Sequence` fails on Python >= 3.10",
        False,
    ),
    (
        "MinkowskiEngine/MinkowskiKernelGenerator.py",
        "from collections import Sequence, namedtuple\n",
        "from collections import namedtuple\n"
        "from collections.abc import Sequence  # patched: removed from collections in Python 3.10\n",
        "`from collections import Sequence` fails on Python >= 3.10",
        False,
    ),
    (
        "src/coordinate_map_manager.cpp",
        EMPTY_MAP_OLD,
        EMPTY_MAP_NEW,
        "kernel_map() returned a reference to a temporary for empty coordinate maps (-Wreturn-local-addr)",
        False,
    ),
    (
        "src/coordinate_map_functors.cuh",
        "struct find_coordinate\n"
        "    : public thrust::unary_function<uint32_t,\n"
        "                                    thrust::pair<uint32_t, uint32_t>> {\n",
        "struct find_coordinate {\n"
        "  // patched: thrust::unary_function is gone in CUDA 13 (CCCL 3); it only\n"
        "  // provided these two typedefs.\n"
        "  using argument_type = uint32_t;\n"
        "  using result_type = thrust::pair<uint32_t, uint32_t>;\n",
        "thrust::unary_function was removed in CUDA 13 (CCCL 3)",
        True,
    ),
    (
        "src/gpu.cuh",
        '#include "utils.hpp"\n',
        '#include "utils.hpp"\n\n' + THRUST_INCLUDES,
        "thrust algorithms used without their headers (CUDA >= 12)",
        True,
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "#include <cudf/detail/nvtx/ranges.hpp>\n",
        "// patched: the bundled (pre-release) nvtx3.hpp clashes with the toolkit's nvtx3,\n"
        "// which CUB includes in CUDA >= 12 ('nvtx3::domain is ambiguous'); the only use\n"
        "// was one profiling range, so it is compiled out.\n"
        "#define CUDF_FUNC_RANGE()\n",
        "bundled cudf nvtx3.hpp clashes with the toolkit's nvtx3 included by CUB (CUDA >= 12)",
        True,
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "#include <thrust/count.h>\n",
        "#include <thrust/count.h>\n" + THRUST_INCLUDES,
        "thrust::device / count_if used without <thrust/execution_policy.h> (CUDA >= 12)",
        True,
    ),
]


def apply(root: pathlib.Path, cuda: bool) -> int:
    changed = 0
    for rel, old, new, reason, cuda_only in EDITS:
        if cuda_only and not cuda:
            continue
        path = root / rel
        if not path.is_file():
            sys.exit(f"patch: {path} not found; is {root} an unpacked MinkowskiEngine 0.5.4 sdist?")
        text = path.read_text()
        if new in text:
            print(f"patch: already applied: {rel}: {reason}")
            continue
        if text.count(old) != 1:
            sys.exit(f"patch: anchor for {rel!r} found {text.count(old)} times (expected 1): is this ME 0.5.4?")
        path.write_text(text.replace(old, new))
        changed += 1
        print(f"patch: {rel}: {reason}")
    return changed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=pathlib.Path, help="unpacked MinkowskiEngine-0.5.4 directory")
    parser.add_argument("--cuda", action="store_true", help="also apply the CUDA-only edits")
    args = parser.parse_args()
    init = args.src / "MinkowskiEngine" / "__init__.py"
    if not init.is_file() or '__version__ = "0.5.4"' not in init.read_text():
        sys.exit(f"patch: {args.src} is not MinkowskiEngine 0.5.4 (these patches are written for that version)")
    print(f"patch: {apply(args.src, args.cuda)} edit(s) applied to {args.src}")


if __name__ == "__main__":
    main()
