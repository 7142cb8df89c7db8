"""FlexiCubes' surface scan in Warp (kernels_flexicubes.surface_scan) against the torch path:
bit-exact surface cubes, cases and cut-edge start nodes (values and order) on random fields,
analytic shapes, empty and full fields, tiny and anisotropic grids, rows that end on and around
the 64-node word boundaries, float32 and float64; the closed-boundary error (same message as
grid.check_closed_boundary) on every face; bad input; CUDA when present."""

import pytest
import torch

from diffworld.geometry.flexicubes import flexicubes
from diffworld.geometry.grid import Grid, check_closed_boundary
from diffworld.geometry.kernels_flexicubes import SurfaceScan, surface_scan, surface_scan_torch

DTYPES = [torch.float32, torch.float64]
# Node shapes (nx+1, ny+1, nz+1): 1x1x1 cubes, 3x5x7, rows of 15-17 nodes (the unrolled packing),
# 63-66 and 128-130 nodes (one or two 64-bit words, with 0-2 nodes in the last), a longer one.
SHAPES = [(2, 2, 2), (4, 6, 8), (8, 6, 4), (3, 3, 15), (3, 3, 16), (3, 3, 17), (3, 4, 63), (3, 4, 64),
          (3, 4, 65), (3, 4, 66), (4, 3, 128), (4, 4, 129), (2, 3, 130), (17, 9, 5), (20, 31, 200)]


def _assert_same(got: SurfaceScan, want: SurfaceScan) -> None:
    assert got.cubes.dtype == torch.int64 and got.case.dtype == torch.uint8
    assert torch.equal(got.cubes, want.cubes)
    assert torch.equal(got.case, want.case)
    assert len(got.cut_starts) == 3
    for a in range(3):
        assert got.cut_starts[a].dtype == torch.int64
        assert torch.equal(got.cut_starts[a], want.cut_starts[a]), a


def _closed(s: torch.Tensor) -> torch.Tensor:
    """Positive on the boundary nodes (a closed surface)."""
    s = s.clone()
    s[0], s[-1], s[:, 0], s[:, -1], s[:, :, 0], s[:, :, -1] = 1, 1, 1, 1, 1, 1
    return s


def _sphere(res, r=0.4, dtype=torch.float64):
    return Grid.make(res).nodes(dtype=dtype).norm(dim=-1) - r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_random_fields_match_torch(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    for threshold in (0.0, 0.8, -0.8):  # balanced, mostly inside, mostly outside
        s = (torch.randn(shape, generator=g, dtype=torch.float64) + threshold).to(dtype)
        _assert_same(surface_scan(s, check_boundary=False), surface_scan_torch(s, check_boundary=False))
        closed = _closed(s)
        _assert_same(surface_scan(closed), surface_scan_torch(closed))


def test_every_case_and_every_corner_bit():
    # 1x1x1 cube: all 256 sign patterns; the case is the pattern itself (corner c = x + 2y + 4z).
    for code in range(256):
        s = torch.ones((2, 2, 2))
        for c in range(8):
            if code >> c & 1:
                s[c & 1, c >> 1 & 1, c >> 2] = -1.0
        got, want = surface_scan(s, check_boundary=False), surface_scan_torch(s, check_boundary=False)
        _assert_same(got, want)
        if 0 < code < 255:
            assert got.cubes.tolist() == [[0, 0, 0]] and int(got.case[0]) == code
        else:
            assert got.cubes.shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("res", [8, 33, (12, 20, 70)])
def test_sphere_matches_torch_and_flexicubes(res, dtype):
    s = _sphere(res, dtype=dtype)
    got = surface_scan(s)
    _assert_same(got, surface_scan_torch(s))
    assert got.cubes.shape[0] > 0 and all(c.shape[0] > 0 for c in got.cut_starts)
    assert (got.case > 0).all() and (got.case < 255).all()
    # The cubes FlexiCubes builds its dual vertices in (found by its own torch scan).
    assert torch.equal(got.cubes, flexicubes(s).cubes)


def test_zero_values_are_outside_and_negative_zero_too():
    s = torch.ones((5, 5, 5), dtype=torch.float64)
    s[2, 2, 2] = -0.0  # not < 0: no surface
    s[1, 2, 3] = 0.0
    assert surface_scan(s).cubes.shape == (0, 3)
    s[2, 2, 2] = -1e-300
    _assert_same(surface_scan(s), surface_scan_torch(s))
    assert surface_scan(s).cubes.shape[0] == 8


def test_nan_reads_as_outside_like_torch():
    g = torch.Generator().manual_seed(3)
    s = _closed(torch.randn((9, 10, 11), generator=g))
    s[torch.rand(s.shape, generator=g) < 0.1] = float("nan")
    _assert_same(surface_scan(s), surface_scan_torch(s))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 2, 2), (4, 6, 8), (30, 3, 70)])
def test_empty_field_gives_well_formed_empty_outputs(shape, dtype):
    for s in (torch.ones(shape, dtype=dtype), torch.full(shape, 1e-30, dtype=dtype)):
        got = surface_scan(s)
        assert got.cubes.shape == (0, 3) and got.cubes.dtype == torch.int64
        assert got.case.shape == (0,) and got.case.dtype == torch.uint8
        assert all(c.shape == (0, 3) and c.dtype == torch.int64 for c in got.cut_starts)
        _assert_same(got, surface_scan_torch(s))


def test_all_inside_without_boundary_check_has_no_surface():
    s = -torch.ones((4, 5, 70))
    got = surface_scan(s, check_boundary=False)
    assert got.cubes.shape == (0, 3) and all(c.shape == (0, 3) for c in got.cut_starts)


def test_one_inside_node_is_surrounded_by_8_cubes_and_6_cut_edges():
    s = torch.ones((5, 6, 7))
    s[2, 3, 4] = -1.0
    got = surface_scan(s)
    assert got.cubes.tolist() == [[i, j, k] for i in (1, 2) for j in (2, 3) for k in (3, 4)]
    assert [c.tolist() for c in got.cut_starts] == [[[1, 3, 4], [2, 3, 4]], [[2, 2, 4], [2, 3, 4]],
                                                   [[2, 3, 3], [2, 3, 4]]]
    # The node is corner 7 of cube (1, 2, 3) and corner 0 of cube (2, 3, 4).
    assert int(got.case[0]) == 128 and int(got.case[-1]) == 1


def _open_message(s: torch.Tensor, name: str = "sdf") -> str:
    with pytest.raises(ValueError) as info:
        check_closed_boundary(s < 0, name)
    return str(info.value)


@pytest.mark.parametrize("node", [(0, 2, 3), (-1, 2, 3), (2, 0, 3), (2, -1, 3), (2, 3, 0), (2, 3, -1),
                                  (0, 0, 0), (-1, -1, -1), (0, -1, 65), (3, 2, 64)])
def test_boundary_node_inside_raises_the_grid_error(node):
    shape = (5, 6, 66) if node != (3, 2, 64) else (5, 6, 65)  # last node alone in its 64-bit word
    s = torch.ones(shape, dtype=torch.float64)
    s[2, 3, 4] = -1.0
    s[node] = -0.5
    with pytest.raises(ValueError) as info:
        surface_scan(s)
    assert str(info.value) == _open_message(s)
    with pytest.raises(ValueError, match="'phi': negative"):
        surface_scan(s.float(), name="phi")
    # Without the check the scan still runs and matches torch.
    _assert_same(surface_scan(s, check_boundary=False), surface_scan_torch(s, check_boundary=False))


def test_interior_nodes_next_to_the_boundary_are_fine():
    s = torch.ones((6, 7, 66))
    s[1:-1, 1:-1, 1:-1] = -1.0
    _assert_same(surface_scan(s), surface_scan_torch(s))


def test_non_contiguous_and_requires_grad_inputs():
    g = torch.Generator().manual_seed(5)
    base = _closed(torch.randn((12, 9, 20), generator=g, dtype=torch.float64))
    t = base.permute(2, 0, 1)  # not contiguous
    _assert_same(surface_scan(t), surface_scan_torch(t))
    leaf = base.clone().requires_grad_()
    got = surface_scan(leaf)
    _assert_same(got, surface_scan_torch(base))
    assert leaf.grad is None


def test_bad_input():
    with pytest.raises(TypeError, match="'sdf'"):
        surface_scan(torch.ones((3, 3, 3), dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        surface_scan([[[1.0]]])
    with pytest.raises(ValueError, match=r"\(nx\+1, ny\+1, nz\+1\)"):
        surface_scan(torch.ones((3, 3)))
    with pytest.raises(ValueError, match=r"every n >= 1"):
        surface_scan(torch.ones((3, 1, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(7)
    for s in (_sphere((40, 33, 130), dtype=dtype), _closed(torch.randn((17, 66, 65), generator=g).to(dtype))):
        got = surface_scan(s.cuda())
        assert got.cubes.is_cuda and got.case.is_cuda
        _assert_same(SurfaceScan(got.cubes.cpu(), got.case.cpu(), tuple(c.cpu() for c in got.cut_starts)),
                     surface_scan_torch(s))
    bad = torch.ones((5, 5, 5), dtype=dtype, device="cuda")
    bad[0, 2, 2] = -1
    with pytest.raises(ValueError, match="grid boundary"):
        surface_scan(bad)
