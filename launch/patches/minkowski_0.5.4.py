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

# (file, anchor text, replacement, reason, applies to CUDA builds only[, occurrences of the anchor])
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
        "src/coordinate_map_gpu.cuh",
        """      m_map = map_type::create(
          compute_hash_table_size(size, m_hashtable_occupancy),
          m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);
""",
        """      {
        // patched: build the shared_ptr from the raw pointer and deleter.
        // Converting the unique_ptr makes libstdc++'s unqualified
        // __to_address ambiguous with cuda::std's (CUDA 13: thrust::pair is
        // cuda::std::pair, an associated namespace of map_type).
        auto created = map_type::create(
            compute_hash_table_size(size, m_hashtable_occupancy),
            m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);
        auto deleter = created.get_deleter();
        m_map = std::shared_ptr<map_type>(created.release(), deleter);
      }
""",
        "shared_ptr from unique_ptr: ambiguous std::__to_address vs cuda::std::__to_address (CUDA 13)",
        True,
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "#include <type_traits>\n",
        """#include <type_traits>

// patched: CUDA 13 changed cudaMemPrefetchAsync to take a cudaMemLocation and flags.
inline cudaError_t me_mem_prefetch_async(const void* ptr, size_t count, int device,
                                         cudaStream_t stream) {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = cudaMemLocationTypeDevice;
  location.id = device;
  return cudaMemPrefetchAsync(ptr, count, location, 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, count, device, stream);
#endif
}
""",
        "cudaMemPrefetchAsync's signature changed in CUDA 13 (helper)",
        True,
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "cudaMemPrefetchAsync(m_hashtbl_values, m_capacity * sizeof(value_type), dev_id, stream)",
        "me_mem_prefetch_async(m_hashtbl_values, m_capacity * sizeof(value_type), dev_id, stream)",
        "cudaMemPrefetchAsync's signature changed in CUDA 13 (calls)",
        True,
        2,
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "cudaMemPrefetchAsync(this, sizeof(*this), dev_id, stream)",
        "me_mem_prefetch_async(this, sizeof(*this), dev_id, stream)",
        "cudaMemPrefetchAsync's signature changed in CUDA 13 (calls)",
        True,
    ),
    (
        "src/spmm.cu",
        "#include <ATen/cuda/CUDAContext.h>\n#include <ATen/cuda/CUDAUtils.h>\n",
        "#include <torch/extension.h>  // patched: first; torch 2.14's CUDAUtils.h needs a complete at::Tensor\n"
        "#include <ATen/cuda/CUDAContext.h>\n#include <ATen/cuda/CUDAUtils.h>\n",
        "torch >= 2.1x: ATen/cuda/CUDAUtils.h uses at::Tensor without including it",
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
    for edit in EDITS:
        rel, old, new, reason, cuda_only = edit[:5]
        expected = edit[5] if len(edit) > 5 else 1  # occurrences of the anchor
        if cuda_only and not cuda:
            continue
        path = root / rel
        if not path.is_file():
            sys.exit(f"patch: {path} not found; is {root} an unpacked MinkowskiEngine 0.5.4 sdist?")
        text = path.read_text()
        if new in text:
            print(f"patch: already applied: {rel}: {reason}")
            continue
        if text.count(old) != expected:
            sys.exit(f"patch: anchor for {rel!r} found {text.count(old)} times (expected {expected}): is this ME 0.5.4?")
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
