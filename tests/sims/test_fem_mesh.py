"""FEM tet mesh: the Kuhn box mesh (exact volumes, conformity, a closed outward 2-manifold
surface), lumped masses (sum and float64 gradcheck), rest matrices, FlexiCubes tets against the
sphere, .vtu/.msh round trips, orientation repair on random meshes, and every bad-input message."""

import dataclasses
import math
from collections import Counter

import meshio
import numpy as np
import pytest
import torch

from diffworld.sims.fem import TetMesh

BOXES = [((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1, 1, 1)),
         ((-0.1, 0.2, 0.3), (0.4, 0.5, 0.35), (3, 2, 4)),
         ((0.0, 0.0, 0.0), (0.1, 0.02, 0.02), (10, 2, 2))]

# Outward faces of a positive tet (a, b, c, d), written independently of the library's table:
# each face is ordered so that the remaining corner lies on its negative side.
TET_FACES = ((1, 2, 3), (0, 3, 2), (0, 1, 3), (0, 2, 1))


def _cube_mesh(res=(2, 2, 2)) -> TetMesh:
    return TetMesh.box((0, 0, 0), (1, 1, 1), res)


def _jittered(res, amp, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Box vertices moved by up to ``amp`` cells per axis, uniformly at random, and its tets."""
    box = TetMesh.box((0, 0, 0), res, res)  # unit cells
    v = box.vertices + amp * (2 * torch.rand(box.vertices.shape, generator=gen, dtype=torch.float64) - 1)
    return v, box.tets


def _rotated(tri) -> tuple:
    """An oriented triangle as the rotation starting at its smallest index (orientation kept)."""
    k = tri.index(min(tri))
    return tuple(tri[k:] + tri[:k])


def _enclosed_volume(vertices: torch.Tensor, faces: torch.Tensor) -> float:
    """Volume enclosed by oriented triangles, by the divergence theorem: sum a . (b x c) / 6."""
    p = vertices[faces]
    return float(torch.linalg.det(p).sum() / 6)


# ---------------------------------------------------------------- box mesh


@pytest.mark.parametrize("lower, upper, res", BOXES)
def test_box_volumes_sum_to_box_and_are_all_equal_and_positive(lower, upper, res):
    mesh = TetMesh.box(lower, upper, res)
    size = np.subtract(upper, lower)
    nx, ny, nz = res
    assert mesh.n_tets == 6 * nx * ny * nz and mesh.n_vertices == (nx + 1) * (ny + 1) * (nz + 1)
    assert mesh.vertices.dtype == torch.float64 and mesh.tets.dtype == torch.int64
    cell = float(np.prod(size / res))
    assert torch.allclose(mesh.rest_volume, torch.full_like(mesh.rest_volume, cell / 6), rtol=1e-12, atol=0)
    assert math.isclose(mesh.volume(), float(np.prod(size)), rel_tol=1e-13)
    assert bool((mesh.rest_volume > 0).all())
    # the box's corners are exactly its nodes' extremes
    assert mesh.vertices.min(0).values.tolist() == list(lower) and mesh.vertices.max(0).values.tolist() == list(upper)


@pytest.mark.parametrize("lower, upper, res", BOXES)
def test_box_is_conforming(lower, upper, res):
    """Every face is used once (boundary) or twice with opposite orientations (interior)."""
    mesh = TetMesh.box(lower, upper, res)
    oriented = Counter()
    for tet in mesh.tets.tolist():
        for f in TET_FACES:
            oriented[_rotated([tet[i] for i in f])] += 1
    assert max(oriented.values()) == 1  # no face appears twice with the same orientation
    unoriented = Counter(tuple(sorted(f)) for f in oriented)
    assert set(unoriented.values()) <= {1, 2}
    for f in oriented:
        if unoriented[tuple(sorted(f))] == 2:
            assert _rotated([f[0], f[2], f[1]]) in oriented  # its partner is the reversed triangle
    nx, ny, nz = res
    n_boundary = sum(1 for c in unoriented.values() if c == 1)
    n_interior = sum(1 for c in unoriented.values() if c == 2)
    assert n_boundary == 4 * (nx * ny + ny * nz + nx * nz)
    assert 2 * n_interior + n_boundary == 4 * mesh.n_tets


@pytest.mark.parametrize("lower, upper, res", BOXES)
def test_box_surface_is_closed_outward_2_manifold(lower, upper, res):
    mesh = TetMesh.box(lower, upper, res)
    faces = mesh.surface_faces()
    nx, ny, nz = res
    assert faces.shape == (2 * (2 * (nx * ny + ny * nz + nx * nz)), 3) and faces.dtype == torch.int64
    # watertight 2-manifold: each directed edge once, and its reverse once
    directed = Counter()
    for a, b, c in faces.tolist():
        directed.update([(a, b), (b, c), (c, a)])
    assert max(directed.values()) == 1
    assert all((b, a) in directed for a, b in directed)
    n_edges = len(directed) // 2
    nodes = mesh.surface_nodes()
    assert nodes.tolist() == sorted(set(faces.reshape(-1).tolist()))
    assert nodes.numel() - n_edges + faces.shape[0] == 2  # Euler characteristic of a sphere
    # outward: the divergence theorem recovers the volume (inward faces would give its negative)
    assert math.isclose(_enclosed_volume(mesh.vertices, faces), float(np.prod(np.subtract(upper, lower))),
                        rel_tol=1e-12)
    # and each face's normal points along the outward normal of the box side it lies on
    p = mesh.vertices[faces]
    n = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    centre = p.mean(1)
    lo, hi = torch.tensor(lower, dtype=torch.float64), torch.tensor(upper, dtype=torch.float64)
    side = torch.where((centre - lo).abs() < 1e-12, -1.0, torch.where((centre - hi).abs() < 1e-12, 1.0, 0.0))
    assert bool(((side != 0).sum(1) == 1).all())
    assert bool(((n * side).sum(1) > 0).all())
    # the surface nodes are exactly the nodes on the box's sides
    on_side = mesh.nodes_where(lambda x: torch.minimum((x - lo).abs(), (x - hi).abs()).min(1).values < 1e-12)
    assert torch.equal(nodes, on_side)


def test_box_rejects_bad_arguments():
    with pytest.raises(ValueError, match="on y got lower 1, upper 1"):
        TetMesh.box((0, 1, 0), (1, 1, 1), 2)
    with pytest.raises(ValueError, match="'res'"):
        TetMesh.box((0, 0, 0), (1, 1, 1), (2, 0, 2))
    with pytest.raises(ValueError, match="'res'"):
        TetMesh.box((0, 0, 0), (1, 1, 1), 2.5)
    with pytest.raises(ValueError, match="'lower' and 'upper'"):
        TetMesh.box((0, 0), (1, 1, 1), 2)


# ---------------------------------------------------------------- rest quantities and masses


def test_dm_inv_inverts_rest_edges_and_volumes_match():
    gen = torch.Generator().manual_seed(3)
    v, t = _jittered((3, 2, 2), 0.2, gen)
    mesh = TetMesh.from_arrays(v, t)
    p = v[t]
    Dm = torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], -1)  # edges as columns
    eye = torch.eye(3, dtype=torch.float64).expand(mesh.n_tets, 3, 3)
    assert torch.allclose(mesh.Dm_inv @ Dm, eye, atol=1e-12)
    assert torch.allclose(Dm @ mesh.Dm_inv, eye, atol=1e-12)
    assert torch.allclose(mesh.rest_volume, torch.linalg.det(Dm) / 6, rtol=1e-13, atol=0)
    # edge lengths in the documented order 01, 02, 03, 12, 13, 23
    pairs = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
    expect = torch.stack([(p[:, j] - p[:, i]).norm(dim=1) for i, j in pairs], 1)
    assert torch.allclose(mesh.edge_lengths, expect, rtol=1e-14, atol=0)
    assert mesh.min_edge() == float(expect.min())


def test_lumped_masses_sum_split_and_gradients():
    mesh = TetMesh.box((0, 0, 0), (0.2, 0.1, 0.1), (2, 1, 1))
    masses = mesh.lumped_masses(1000.0)
    assert masses.shape == (mesh.n_vertices,) and masses.dtype == torch.float64
    assert math.isclose(float(masses.sum()), 1000.0 * 0.002, rel_tol=1e-13)
    # a node's mass is a quarter of the mass of the tets around it
    per_node = [sum(float(mesh.rest_volume[e]) for e in range(mesh.n_tets) if n in mesh.tets[e].tolist())
                for n in range(mesh.n_vertices)]
    assert torch.allclose(masses, 1000.0 * torch.tensor(per_node, dtype=torch.float64) / 4, rtol=1e-13)
    # scalar tensor density: d(total mass)/d(density) = total volume
    rho = torch.tensor(800.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(mesh.lumped_masses(rho).sum(), rho)
    assert math.isclose(float(g), mesh.volume(), rel_tol=1e-13)
    # per-tet density, float64 gradcheck
    gen = torch.Generator().manual_seed(0)
    rho_t = (500 + 1000 * torch.rand(mesh.n_tets, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(mesh.lumped_masses, (rho_t,), eps=1e-3, atol=1e-10)
    rho_t = rho_t.detach()
    assert math.isclose(float(mesh.lumped_masses(rho_t).sum()), float((rho_t * mesh.rest_volume).sum()), rel_tol=1e-13)


def test_lumped_masses_reject_bad_density():
    mesh = _cube_mesh((1, 1, 1))
    rho = torch.full((mesh.n_tets,), 1000.0, dtype=torch.float64)
    rho[4] = -1.0
    with pytest.raises(ValueError, match=r"tets 4 \(-1 kg/m\^3\)"):
        mesh.lumped_masses(rho)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        mesh.lumped_masses(torch.ones(5))
    with pytest.raises(ValueError, match="finite and > 0"):
        mesh.lumped_masses(float("nan"))
    with pytest.raises(TypeError, match="'density'"):
        mesh.lumped_masses("1000")


def test_to_float32_keeps_rest_quantities_consistent():
    mesh = TetMesh.box((0, 0, 0), (0.3, 0.1, 0.1), (3, 1, 1))
    m32 = mesh.to(torch.float32)
    assert m32.vertices.dtype == m32.Dm_inv.dtype == m32.rest_volume.dtype == m32.edge_lengths.dtype == torch.float32
    assert m32.tets.dtype == torch.int64 and m32.name == "box"
    assert torch.allclose(m32.rest_volume.double(), mesh.rest_volume, rtol=1e-6)
    assert torch.allclose(m32.Dm_inv.double(), mesh.Dm_inv, rtol=1e-6)
    assert m32.lumped_masses(1000.0).dtype == torch.float32
    assert torch.equal(m32.surface_faces(), mesh.surface_faces())
    back = m32.to(torch.float64, "cpu")
    assert back.vertices.dtype == torch.float64 and back.vertices.device.type == "cpu"
    with pytest.raises(TypeError, match="float32 or float64"):
        mesh.to(torch.float16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mesh.name = "other"


# ---------------------------------------------------------------- node sets


def test_node_selection():
    mesh = TetMesh.box((0, 0, 0), (0.1, 0.02, 0.03), (5, 2, 3))
    clamped = mesh.nodes_in_box((0, 0, 0), (0, 0.02, 0.03))  # the plane x = 0, bounds included
    assert clamped.numel() == 3 * 4 and bool((mesh.vertices[clamped, 0] == 0).all())
    assert torch.equal(clamped, mesh.nodes_where(lambda x: x[:, 0] <= 0))
    tip = mesh.nodes_in_box((0.1, 0, 0), (0.1, 0.02, 0.03))  # found although 0.1 is not exact in binary
    assert tip.numel() == 12
    assert mesh.nodes_in_box((1, 1, 1), (2, 2, 2)).shape == (0,)
    assert torch.equal(mesh.nodes_where(lambda x: x[:, 2].numpy() > 0.025), mesh.nodes_in_box((0, 0, 0.026), (1, 1, 1)))
    with pytest.raises(TypeError, match="bool tensor"):
        mesh.nodes_where(lambda x: x[:, 0])
    with pytest.raises(ValueError, match=r"shape \(72,\)"):
        mesh.nodes_where(lambda x: x[:3, 0] > 0)
    with pytest.raises(ValueError, match="below 'lower'"):
        mesh.nodes_in_box((0, 0, 1), (1, 1, 0))


# ---------------------------------------------------------------- FlexiCubes


def test_from_flexicubes_sphere_volume_area_and_surface():
    from diffworld.geometry.flexicubes import flexicubes

    n, r = 16, 0.35
    x = torch.linspace(-0.5, 0.5, n + 1, dtype=torch.float64)
    X, Y, Z = torch.meshgrid(x, x, x, indexing="ij")
    sdf = ((X ** 2 + Y ** 2 + Z ** 2).sqrt() - r).requires_grad_()
    fc = flexicubes(sdf, output="tetrahedra")
    mesh = TetMesh.from_flexicubes(fc)
    assert not mesh.vertices.requires_grad  # the rest shape is a constant
    assert torch.equal(mesh.tets, fc.tets) and mesh.name == "flexicubes"
    assert torch.equal(TetMesh.from_flexicubes(fc.tet_mesh).vertices, mesh.vertices)  # geometry's TetMesh too
    assert math.isclose(mesh.volume(), 4 / 3 * math.pi * r ** 3, rel_tol=0.05)
    faces = mesh.surface_faces()
    p = mesh.vertices[faces]
    area = float(torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]).norm(dim=1).sum() / 2)
    assert math.isclose(area, 4 * math.pi * r ** 2, rel_tol=0.05)
    # the boundary of the tets is FlexiCubes' own surface, with the same (outward) orientation
    assert {_rotated(f) for f in faces.tolist()} == {_rotated(f) for f in fc.faces.tolist()}
    assert math.isclose(_enclosed_volume(mesh.vertices, faces), mesh.volume(), rel_tol=1e-10)
    with pytest.raises(TypeError, match="output='tetrahedra'"):
        TetMesh.from_flexicubes(flexicubes(sdf.detach()))


# ---------------------------------------------------------------- files


def test_vtu_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(1)
    v, t = _jittered((2, 2, 1), 0.2, gen)
    mesh = TetMesh.from_arrays(v, t)
    path = mesh.save(tmp_path / "solid.vtu")
    back = TetMesh.load(path)
    assert torch.equal(back.vertices, mesh.vertices) and torch.equal(back.tets, mesh.tets)
    assert back.name == str(path)
    legacy = TetMesh.load(mesh.save(tmp_path / "solid.vtk"))
    assert torch.equal(legacy.tets, mesh.tets) and torch.allclose(legacy.vertices, mesh.vertices, rtol=1e-15)


@pytest.mark.parametrize("fmt", ["gmsh22", "gmsh"])
def test_msh_round_trip_keeps_only_tets(tmp_path, fmt):
    mesh = TetMesh.box((0, 0, 0), (1, 0.5, 0.5), (2, 1, 1))
    # a Gmsh-like file: one extra point, and (Gmsh 2.2) boundary triangles and a point cell beside
    # the tets; meshio writes several cell types in Gmsh 4.1 only with full entity data (the
    # hand-written file below covers that)
    points = np.concatenate([mesh.vertices.numpy(), [[5.0, 5.0, 5.0]]])
    cells = [("tetra", mesh.tets.numpy())]
    if fmt == "gmsh22":
        cells = [("vertex", np.array([[0]])), ("triangle", mesh.surface_faces().numpy())] + cells
    path = tmp_path / "part.msh"
    meshio.write(str(path), meshio.Mesh(points, cells), file_format=fmt, binary=False)
    back = TetMesh.load(path)
    assert torch.equal(back.tets, mesh.tets) and torch.equal(back.vertices[:-1], mesh.vertices)
    assert back.n_vertices == mesh.n_vertices + 1 and "(1 unused)" in repr(back)
    assert math.isclose(back.lumped_masses(2.0).sum().item(), 2.0 * mesh.volume(), rel_tol=1e-13)
    assert float(back.lumped_masses(2.0)[-1]) == 0.0
    again = TetMesh.load(back.save(tmp_path / "again.msh"))
    assert torch.equal(again.tets, back.tets) and torch.equal(again.vertices, back.vertices)


# What Gmsh 4.1 writes (ASCII): a surface and a volume entity with physical groups, nodes in
# entity blocks, one boundary triangle and two tets (node tags from 1).
GMSH41 = """$MeshFormat
4.1 0 8
$EndMeshFormat
$Entities
0 0 1 1
1 0 0 0 1 1 0 1 3 0
1 0 0 0 1 1 1 1 7 1 1
$EndEntities
$Nodes
2 5 1 5
2 1 0 3
1
2
3
0 0 0
1 0 0
0 1 0
3 1 0 2
4
5
0 0 1
0.2 0.2 0.2
$EndNodes
$Elements
2 3 1 3
2 1 2 1
1 1 3 2
3 1 4 2
2 1 2 3 5
3 1 2 5 4
$EndElements
"""


def test_gmsh41_file_with_entities(tmp_path):
    path = tmp_path / "gel.msh"
    path.write_text(GMSH41)
    mesh = TetMesh.load(path)
    assert mesh.tets.tolist() == [[0, 1, 2, 4], [0, 1, 4, 3]]
    assert torch.allclose(mesh.rest_volume, torch.full((2,), 0.2 / 6, dtype=torch.float64), rtol=1e-14)
    swapped = tmp_path / "swapped.msh"
    swapped.write_text(GMSH41.replace("3 1 2 5 4", "3 2 1 5 4"))
    with pytest.raises(ValueError, match=r"swapped\.msh.*tets 1 \(-0\.0333 m\^3\).*orient=True"):
        TetMesh.load(swapped)
    assert TetMesh.load(swapped, orient=True).volume() == pytest.approx(0.4 / 6, rel=1e-14)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.vtu"):
        TetMesh.load(tmp_path / "missing.vtu")
    stl = tmp_path / "shape.stl"
    stl.write_text("solid x\nendsolid x\n")
    with pytest.raises(ValueError, match=r"shape\.stl.*'\.msh'"):
        TetMesh.load(stl)
    bad = tmp_path / "broken.msh"
    bad.write_text("not a mesh\n")
    with pytest.raises(ValueError, match=r"could not read .*broken\.msh"):
        TetMesh.load(bad)
    mesh = _cube_mesh((1, 1, 1))
    surface_only = tmp_path / "surface.msh"
    meshio.write(str(surface_only), meshio.Mesh(mesh.vertices.numpy(), [("triangle", mesh.surface_faces().numpy())]),
                 file_format="gmsh22", binary=False)
    with pytest.raises(ValueError, match=r"surface\.msh.*no linear tetrahedra.*triangle"):
        TetMesh.load(surface_only)
    flipped = mesh.tets.numpy().copy()
    flipped[2] = flipped[2, [0, 2, 1, 3]]
    inverted = tmp_path / "inverted.msh"
    meshio.write(str(inverted), meshio.Mesh(mesh.vertices.numpy(), [("tetra", flipped)]), file_format="gmsh22",
                 binary=False)
    with pytest.raises(ValueError, match=r"inverted\.msh.*tets 2 \(-0\.167 m\^3\).*orient=True"):
        TetMesh.load(inverted)
    assert torch.equal(TetMesh.load(inverted, orient=True).rest_volume, mesh.rest_volume)
    # VTK's writers refuse an index past the points, so write a legacy file by hand
    t = mesh.tets.tolist()
    t[3][1] = 8  # 8 vertices: index 8 is one past the end
    lines = ["# vtk DataFile Version 3.0", "bad index", "ASCII", "DATASET UNSTRUCTURED_GRID", "POINTS 8 double"]
    lines += [" ".join(map(str, p)) for p in mesh.vertices.tolist()]
    lines += [f"CELLS {len(t)} {5 * len(t)}"] + ["4 " + " ".join(map(str, r)) for r in t]
    lines += [f"CELL_TYPES {len(t)}"] + ["10"] * len(t)
    out_of_range = tmp_path / "range.vtk"
    out_of_range.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"range\.vtk.*tets\[3\].*index 8 outside \[0, 8\)"):
        TetMesh.load(out_of_range)


# ---------------------------------------------------------------- bad arrays


def _cube_arrays():
    mesh = _cube_mesh((1, 1, 1))
    return mesh.vertices.clone(), mesh.tets.clone()


def test_array_errors_name_argument_element_and_value():
    v, t = _cube_arrays()
    bad_v = v.clone()
    bad_v[5, 1] = float("nan")
    with pytest.raises(ValueError, match=r"TetMesh 'mesh'.*'vertices'.*vertices\[5\] = \[1\.0, nan, 1\.0\]"):
        TetMesh.from_arrays(bad_v, t)
    with pytest.raises(ValueError, match=r"'vertices' of shape \(N, 3\), got \(8, 2\)"):
        TetMesh.from_arrays(v[:, :2], t)
    with pytest.raises(TypeError, match="'vertices' of a real dtype.*torch.bool"):
        TetMesh.from_arrays(v > 0, t)
    with pytest.raises(ValueError, match=r"'tets' of shape \(T, 4\), got \(6, 3\)"):
        TetMesh.from_arrays(v, t[:, :3])
    with pytest.raises(TypeError, match="'tets' of an integer dtype.*float32"):
        TetMesh.from_arrays(v, t.float())
    with pytest.raises(ValueError, match="'tets' is empty"):
        TetMesh.from_arrays(v, t[:0])
    bad_t = t.clone()
    bad_t[4, 2] = 99
    with pytest.raises(ValueError, match=r"tets\[4\] = \[.*99.*\] has index 99 outside \[0, 8\)"):
        TetMesh.from_arrays(v, bad_t)
    bad_t[4, 2] = -1
    with pytest.raises(ValueError, match=r"tets\[4\].*index -1"):
        TetMesh.from_arrays(v, bad_t)
    rep = t.clone()
    rep[3, 3] = rep[3, 0]
    with pytest.raises(ValueError, match=r"tets\[3\] = .* repeats a vertex"):
        TetMesh.from_arrays(v, rep)
    with pytest.raises(ValueError, match=r"TetMesh 'beam\.msh'"):
        TetMesh.from_arrays(v, rep, name="beam.msh")


def test_inverted_and_degenerate_tets_are_named():
    v, t = _cube_arrays()
    flipped = t.clone()
    flipped[[1, 4]] = flipped[[1, 4]][:, [1, 0, 2, 3]]
    with pytest.raises(ValueError, match=r"2 inverted tet\(s\).*tets 1 \(-0\.167 m\^3\), 4 \(-0\.167 m\^3\).*orient"):
        TetMesh.from_arrays(v, flipped)
    with pytest.raises(ValueError, match="inverted"):
        TetMesh(v, flipped)  # the plain constructor validates too
    # a flat tet: four vertices in the plane z = 0 (vertex 8 is the middle of the bottom face)
    flat_v = torch.cat([v, torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)])
    flat_t = torch.cat([t, torch.tensor([[0, 2, 6, 8]])])
    for orient in (False, True):  # orienting cannot fix a flat tet
        with pytest.raises(ValueError, match=r"1 degenerate tet\(s\).*tets 6 \(-?0 m\^3\)"):
            TetMesh.from_arrays(flat_v, flat_t, orient=orient)
    # nearly flat: 1e-14 of the cell's volume is still rejected, 1e-9 is kept
    for lift, ok in ((1e-14, False), (1e-9, True)):
        w = flat_v.clone()
        w[8, 2] = -lift
        if ok:
            assert TetMesh.from_arrays(w, flat_t).rest_volume[6] > 0
        else:
            with pytest.raises(ValueError, match="degenerate"):
                TetMesh.from_arrays(w, flat_t)
    many = t.repeat(3, 1)[:, [1, 0, 2, 3]]
    with pytest.raises(ValueError, match=r"18 inverted.*and 13 more"):
        TetMesh.from_arrays(v, many)


def test_unused_vertices_are_allowed_and_counted():
    v, t = _cube_arrays()
    mesh = TetMesh.from_arrays(torch.cat([v, torch.zeros(2, 3, dtype=torch.float64)]), t)
    assert mesh.unused_vertices().tolist() == [8, 9]
    assert "10 vertices (2 unused)" in repr(mesh) and "6 tets" in repr(mesh)


def test_arrays_from_numpy_and_lists_are_converted():
    v, t = _cube_arrays()
    mesh = TetMesh.from_arrays(v.float().numpy(), t.int().tolist())
    assert mesh.vertices.dtype == torch.float64 and mesh.tets.dtype == torch.int64
    leaf = v.clone().requires_grad_()
    assert not TetMesh.from_arrays(leaf, t).vertices.requires_grad


# ---------------------------------------------------------------- orientation repair


def test_orient_fixes_randomly_flipped_tets():
    mesh = TetMesh.box((0, 0, 0), (1, 1, 1), (3, 3, 3))
    gen = torch.Generator().manual_seed(7)
    flip = torch.rand(mesh.n_tets, generator=gen) < 0.3
    tets = torch.where(flip[:, None], mesh.tets[:, [0, 1, 3, 2]], mesh.tets)
    with pytest.raises(ValueError, match=f"{int(flip.sum())} inverted.*tets {int(flip.nonzero()[0])} "):
        TetMesh.from_arrays(mesh.vertices, tets)
    fixed = TetMesh.from_arrays(mesh.vertices, tets, orient=True)
    assert torch.allclose(fixed.rest_volume, mesh.rest_volume, rtol=1e-14)
    assert {_rotated(f) for f in fixed.surface_faces().tolist()} == {_rotated(f) for f in mesh.surface_faces().tolist()}
    assert torch.equal(fixed.tets[~flip], mesh.tets[~flip])  # positive tets are left as they were


def test_orient_on_100_random_meshes():
    """Jittered box meshes (under a quarter cell) with every tet's corners shuffled at random:
    orient=True makes all volumes positive and keeps their sum, which also equals the volume the
    surface encloses."""
    gen = torch.Generator().manual_seed(2024)
    for trial in range(100):
        res = tuple(int(r) for r in torch.randint(1, 4, (3,), generator=gen))
        v, t = _jittered(res, 0.24, gen)
        reference = TetMesh.from_arrays(v, t)  # the jitter keeps the Kuhn tets positive
        perm = torch.argsort(torch.rand(t.shape, generator=gen), dim=1)
        shuffled = torch.gather(t, 1, perm)
        mesh = TetMesh.from_arrays(v, shuffled, orient=True)
        assert bool((mesh.rest_volume > 0).all()), trial
        assert torch.allclose(mesh.rest_volume, reference.rest_volume, rtol=1e-12), trial
        assert math.isclose(mesh.volume(), reference.volume(), rel_tol=1e-12), trial
        assert math.isclose(_enclosed_volume(mesh.vertices, mesh.surface_faces()), mesh.volume(), rel_tol=1e-10), trial
        # the same corners as before, in an even permutation of the shuffled order
        assert torch.equal(mesh.tets.sort(1).values, t.sort(1).values), trial
