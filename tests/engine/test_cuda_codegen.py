"""Every Warp kernel module of the project compiles for CUDA, also on machines without a GPU.

Warp generates CUDA C++ from the same Python kernels and compiles it with NVRTC, which ships in
the warp-lang wheel and needs no driver: code that builds for the CPU can still fail there
(CUDA-only codegen paths, intrinsics, register or stack limits). This compiles each module ahead
of time to PTX for sm_75 (the oldest architecture the wheel's NVRTC accepts: CUDA 13 dropped
sm_70) so CPU-only CI catches that. It runs nothing: results on a GPU are checked by the CUDA
tests, skipped without one.
"""

import importlib
import os
import pathlib

import pytest
import warp as wp

import diffworld

ARCH = 75
MODULES = [
    "diffworld.geometry.kernels_flexicubes",
    "diffworld.geometry.kernels_flexicubes_dual",
    "diffworld.geometry.kernels_isosurface",
    "diffworld.geometry.kernels_sdf",
    "diffworld.render.raster",
    "diffworld.sims.cable.kernels",
    "diffworld.sims.constitutive.kernels_neural",
    "diffworld.sims.coupling.gel_bvh",
    "diffworld.sims.fem.kernels",
    "diffworld.sims.fem.kernels_contact",
    "diffworld.sims.fem.kernels_materials",
    "diffworld.sims.mpm.kernels",
]


@wp.kernel
def _probe(x: wp.array(dtype=wp.float32)):
    x[wp.tid()] = 1.0


@pytest.fixture(scope="module")
def nvrtc(tmp_path_factory):
    """Skip where this Warp build cannot compile for CUDA at all (e.g. a CPU-only build)."""
    try:
        wp.compile_aot_module(_probe.module, arch=ARCH, use_ptx=True, module_dir=tmp_path_factory.mktemp("probe"))
    except Exception as err:  # noqa: BLE001 - any failure here means no CUDA toolchain in this build
        pytest.skip(f"this Warp build cannot compile CUDA code: {err}")


@pytest.mark.parametrize("name", MODULES)
def test_module_compiles_for_cuda(name, nvrtc):
    module = importlib.import_module(name)
    if hasattr(module, "build"):  # kernels built on demand (MPM): build both precisions first
        module.build("float32")
    # Into Warp's kernel cache: a module whose PTX is already there for this source is not rebuilt.
    paths = wp.compile_aot_module(module, arch=ARCH, use_ptx=True)
    assert paths and all(os.path.getsize(p) > 0 for p in paths), paths


def test_every_kernel_module_is_listed():
    """A new Warp kernel module must be added above, or its CUDA build goes unchecked."""
    root = pathlib.Path(diffworld.__file__).parent
    found = sorted("diffworld." + ".".join(p.relative_to(root).with_suffix("").parts)
                   for p in root.rglob("*.py") if "@wp.kernel" in p.read_text())
    assert found == sorted(MODULES)
