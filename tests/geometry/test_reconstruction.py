"""Reconstruction recovers topology from a sphere and matches marching cubes on the true SDF;
FlexiCubes and G-Shell representations: float64 finite differences of the whole loss for every
parameter, refinement, regularizers, and a FlexiCubes fit that beats marching cubes on normals."""

import dataclasses

import pytest
import torch

from diffworld.geometry import shapes
from diffworld.geometry.grid import Grid
from diffworld.geometry.marching_cubes import marching_cubes
from diffworld.geometry.mesh_ops import mesh_report
from diffworld.geometry.metrics import mesh_to_points_metrics
from diffworld.engine.gradcheck import directional_check
from diffworld.geometry.reconstruction import (
    FlexiCubesGrid,
    GridSDF,
    GShellGrid,
    LossWeights,
    ReconstructionTarget,
    reconstruction_losses,
)
from diffworld.geometry.sdf import Sphere, sample_grid

B = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))


def fit(target, resolutions, weights, iterations=40, lr_cells=0.3):
    rep = GridSDF.from_field(Sphere(0.35), resolutions[0], B)
    gen = torch.Generator().manual_seed(0)
    for k, res in enumerate(resolutions):
        if k:
            rep = rep.upsampled(res)
        w = weights if k == len(resolutions) - 1 else dataclasses.replace(weights, chamfer=0.0)
        opt = torch.optim.Adam([rep.values], lr=lr_cells * rep.cell)
        for _ in range(iterations):
            opt.zero_grad()
            loss, _ = reconstruction_losses(rep, target, w, 5000, gen)
            loss.backward()
            opt.step()
    return rep


def test_genus2_from_sphere_recovers_topology_and_beats_nothing_worse_than_mc():
    shape = shapes.genus2_shape()
    pts, nrm = shapes.surface_points(shape, 30000, B)
    ev_p, ev_n = shapes.surface_points(shape, 50000, B, seed=1)
    rep = fit(ReconstructionTarget(pts, nrm, True), [16, 32], LossWeights(chamfer=0.1, normal=2.0, eikonal=1.0))
    mesh = rep.extract()
    report = mesh_report(mesh.vertices.detach(), mesh.faces)
    assert report.watertight and report.edge_manifold and report.consistently_oriented
    assert report.n_components == 1 and report.genus == 2  # no floaters, no extra handles, holes open
    ours = mesh_to_points_metrics(mesh.vertices.detach().double(), mesh.faces, ev_p.double(), ev_n.double(),
                                  n_points=50000, threshold=0.01)
    base = marching_cubes(sample_grid(shape, Grid.make(32)))
    ref = mesh_to_points_metrics(base.vertices.double(), base.faces, ev_p.double(), ev_n.double(),
                                 n_points=50000, threshold=0.01)
    assert ours.fscore >= 0.99
    assert ours.chamfer_l1 <= 1.15 * ref.chamfer_l1, (ours, ref)


def test_without_sign_term_the_sphere_leaves_remnants():
    """Why the sign term exists: field terms at the points alone leave floaters behind."""
    shape = shapes.genus2_shape()
    pts, nrm = shapes.surface_points(shape, 20000, B)
    rep = fit(ReconstructionTarget(pts, nrm, True), [16], LossWeights(chamfer=0.0, normal=1.0, eikonal=0.1, sign=0.0), 40)
    report = mesh_report(*[t.detach() for t in rep.extract()])
    assert report.n_components > 1 or report.genus != 2


# --- FlexiCubes and G-Shell representations ----------------------------------------------------

ALL_TERMS = LossWeights(chamfer=1.0, surface=1.0, normal=0.5, eikonal=0.5, smoothness=0.1, sign=2.0, mesh_normal=0.7,
                        dev=0.5, sdf_sign=0.2, weight_norm=0.1, msdf_negative=1.0, msdf_positive=1.0)


def _noisy_sphere_grid(res, gen, cls=FlexiCubesGrid, **kwargs):
    s = Grid.make(res).nodes(dtype=torch.float64).norm(dim=-1) - 0.3
    s = s + 0.01 * torch.randn(s.shape, generator=gen, dtype=torch.float64)
    n = res
    raw = {"beta": (n, n, n, 12), "alpha": (n, n, n, 8), "gamma": (n, n, n), "deform": (n + 1, n + 1, n + 1, 3)}
    raw = {k: 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64) for k, shape in raw.items()}
    if cls is GShellGrid:
        msdf = 0.05 - Grid.make(res).nodes(dtype=torch.float64)[..., 2]
        return cls(s, msdf, B, **raw, **kwargs)
    return cls(s, B, **raw, **kwargs)


@pytest.mark.parametrize("cls", [FlexiCubesGrid, GShellGrid])
def test_losses_match_finite_differences_for_every_parameter(cls):
    """Every term at once, float64, random directions per parameter tensor (node values, raw
    weights, raw offsets, msdf): the whole loss, FlexiCubes and G-Shell included, is differentiated
    exactly (nearest neighbours and supervision masks are constant under the 1e-5 steps)."""
    gen = torch.Generator().manual_seed(0)
    kwargs = {"msdf_eps": 1.0 / 8, "msdf_radius": 1.0 / 8, "msdf_tangential": 0.5 / 8} if cls is GShellGrid else {}
    rep = _noisy_sphere_grid(8, gen, cls, **kwargs)
    pts, nrm = shapes.surface_points(Sphere(0.3), 400, B, dtype=torch.float64)
    target = ReconstructionTarget(pts[pts[:, 2] < 0.1], nrm[pts[:, 2] < 0.1], True)
    params = rep.parameters()
    names = list(params)
    assert set(names) == {"sdf", "beta", "alpha", "gamma", "deform"} | ({"msdf"} if cls is GShellGrid else set())

    # Per-cube weights and node offsets only act on the surface cubes and their corners: the
    # directions are drawn there (a direction over the whole volume would leave a signal of the
    # size of the rounding error).
    cubes = (rep.extract().template if cls is GShellGrid else rep.extract()).cubes
    corners = (cubes[:, None, :] + torch.tensor([[a, b, c] for c in (0, 1) for b in (0, 1) for a in (0, 1)])
               ).reshape(-1, 3).unique(dim=0)
    where = {n: (cubes if n in ("beta", "alpha", "gamma") else corners if n == "deform" else None) for n in names}
    base = {n: t.detach().clone() for n, t in params.items()}

    def full(name, t):
        idx = where[name]
        if idx is None:
            return t
        return base[name].index_put(tuple(idx.unbind(1)), t)

    def loss(*tensors):
        for name, t in zip(names, tensors):
            setattr(rep, "values" if name == "sdf" else name, full(name, t))
        total, _ = reconstruction_losses(rep, target, ALL_TERMS, 300, torch.Generator().manual_seed(1), progress=0.1)
        return total

    _, terms = reconstruction_losses(rep, target, ALL_TERMS, 300, torch.Generator().manual_seed(1))
    expected = {"chamfer", "mesh_normal", "dev", "weight_norm", "surface", "normal", "sign", "eikonal", "smoothness",
                "sdf_sign"} | ({"msdf_negative", "msdf_positive"} if cls is GShellGrid else set())
    assert set(terms) == expected and all(float(v.detach()) > 0 for v in terms.values()), terms
    compact = [base[n] if where[n] is None else base[n][tuple(where[n].unbind(1))] for n in names]
    for i, name in enumerate(names):
        args = [t.clone().requires_grad_(j == i) for j, t in enumerate(compact)]
        for c in directional_check(loss, args, eps=1e-5, n_dirs=2, seed=i):
            assert abs(c.numeric) > 1e-5 and c.rel_error < 1e-6, (name, c)


def test_refinement_keeps_the_field_and_starts_weights_again():
    gen = torch.Generator().manual_seed(2)
    rep = _noisy_sphere_grid(8, gen, GShellGrid, msdf_eps=0.1, msdf_radius=0.1, learn_deform=False)
    fine = rep.upsampled(16)
    assert type(fine) is GShellGrid and fine.values.shape == (17, 17, 17) and fine.beta.shape == (16, 16, 16, 12)
    assert not fine.learn_deform and "deform" not in fine.parameters() and fine.msdf_eps == 0.1
    for t in (fine.beta, fine.alpha, fine.gamma, fine.deform):
        assert float(t.detach().abs().max()) == 0.0
    # Even nodes of the fine grid are the coarse nodes; trilinear in between (the zero set is kept).
    assert torch.allclose(fine.values.detach()[::2, ::2, ::2], rep.values.detach())
    assert torch.allclose(fine.msdf.detach()[::2, ::2, ::2], rep.msdf.detach())
    mid = 0.5 * (rep.values.detach()[:-1] + rep.values.detach()[1:])
    assert torch.allclose(fine.values.detach()[1::2, ::2, ::2], mid)


def test_weight_norm_counts_the_surface_cubes_only():
    rep = FlexiCubesGrid(Grid.make(8).nodes(dtype=torch.float64).norm(dim=-1) - 0.3, B)
    cubes = rep.extract().cubes
    assert float(rep.weight_norm(cubes).detach()) == 0.0
    with torch.no_grad():
        rep.beta[0, 0, 0, 3] = 5.0  # a corner cube: no surface there
        i, j, k = cubes[0].tolist()
        rep.alpha[i, j, k, 1] = -2.1
    assert float(rep.weight_norm(cubes).detach()) == pytest.approx(2.1 / (21 * cubes.shape[0]))


def test_projection_keeps_the_boundary_nodes_outside():
    rep = FlexiCubesGrid(Grid.make(8).nodes(dtype=torch.float64).norm(dim=-1) - 0.3, B)
    with torch.no_grad():
        rep.values[0, 3, 4] = -0.2
        rep.values[5, 8, 2] = -0.01
        inner = rep.values[1:-1, 1:-1, 1:-1].clone()
        rep.project()
    faces = [rep.values.detach().select(a, i) for a in range(3) for i in (0, 8)]
    assert min(float(f.min()) for f in faces) == pytest.approx(0.01 / 8)
    assert torch.equal(rep.values.detach()[1:-1, 1:-1, 1:-1], inner)
    rep.extract()  # closed again: FlexiCubes accepts it


def test_projection_removes_single_node_specks_only():
    # A sphere r=0.35 on 16^3: a lone outside node inside it (an enclosed void), a lone inside
    # node outside it (a floater), and a two-node void (a real, if small, feature: kept).
    values = Grid.make(16).nodes(dtype=torch.float64).norm(dim=-1) - 0.35
    rep = FlexiCubesGrid(values, B)
    before = mesh_report(*rep.extract()[:2])
    with torch.no_grad():
        rep.values[8, 8, 8] = 0.02
        rep.values[1, 2, 2] = -0.01
        rep.values[5, 8, 8] = rep.values[5, 8, 9] = 0.02
        rep.project()
        v = rep.values.detach()
    assert v[8, 8, 8] < 0
    assert v[1, 2, 2] > 0
    assert v[5, 8, 8] == 0.02 and v[5, 8, 9] == 0.02
    nb = [values[7, 8, 8], values[9, 8, 8], values[8, 7, 8], values[8, 9, 8], values[8, 8, 7], values[8, 8, 9]]
    assert float(v[8, 8, 8]) == pytest.approx(float(sum(nb)) / 6)
    after = mesh_report(*rep.extract()[:2])
    assert before.n_components == 1 and after.n_components == 2  # the sphere and the two-node void


def test_sdf_sign_schedule_falls_linearly_then_stays():
    w = LossWeights(sdf_sign=0.2, sdf_sign_final=0.01, sdf_sign_until=0.25)
    assert [round(w.sdf_sign_at(p), 6) for p in (0.0, 0.125, 0.25, 0.9)] == [0.2, 0.105, 0.01, 0.01]
    assert LossWeights(sdf_sign=0.2).sdf_sign_at(0.9) == 0.2


def test_oriented_mesh_normal_term_sees_an_inside_out_surface():
    """1 - cos with oriented targets costs ~2 for an inverted mesh; 1 - |cos| cannot tell."""
    pts, nrm = shapes.surface_points(Sphere(0.3), 3000, B, dtype=torch.float64)
    mesh = marching_cubes(Grid.make(24).nodes(dtype=torch.float64).norm(dim=-1) - 0.3)
    w = LossWeights(chamfer=1.0, surface=0.0, normal=0.0, eikonal=0.0, sign=0.0, mesh_normal=1.0)
    for faces, oriented, expected in ((mesh.faces, True, 0.0), (mesh.faces.flip(1), True, 2.0),
                                      (mesh.faces.flip(1), False, 0.0)):
        rep = GridSDF(torch.zeros(25, 25, 25, dtype=torch.float64), B)
        rep.extract = lambda training=False, f=faces: type(mesh)(mesh.vertices, f)
        _, terms = reconstruction_losses(rep, ReconstructionTarget(pts, nrm, oriented), w, 3000,
                                         torch.Generator().manual_seed(0))
        assert float(terms["mesh_normal"]) == pytest.approx(expected, abs=0.01), (oriented, terms)


def test_flexicubes_fit_beats_marching_cubes_on_the_sharp_part():
    """From the true SDF at the nodes of a 24^3 grid, 40 steps on weights, offsets and values
    against dense samples (Chamfer + oriented normals) beat marching cubes on the same grid in
    normal consistency and in the share of normals off by more than 5 degrees (the features)."""
    part = shapes.cad_part()
    with torch.no_grad():
        s = sample_grid(part, Grid.make(24)).detach()
    pts, nrm = shapes.surface_points(part, 40000, B, seed=3)
    ev_p, ev_n = shapes.surface_points(part, 60000, B, seed=4)
    rep = FlexiCubesGrid(s, B)
    w = LossWeights(chamfer=1.0, surface=0.0, normal=0.0, eikonal=0.0, sign=0.0, mesh_normal=1.0, dev=0.5,
                    weight_norm=0.1)
    opt = torch.optim.Adam([{"params": list(g["params"].values()), "lr": g["lr"]}
                            for g in rep.parameter_groups(0.1 * rep.cell, 0.1, 0.1)])
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        opt.zero_grad()
        reconstruction_losses(rep, ReconstructionTarget(pts, nrm, True), w, 20000, gen)[0].backward()
        opt.step()

    def quality(m):
        r = mesh_report(m.vertices.detach(), m.faces)
        assert r.watertight and r.consistently_oriented and r.n_components == 1 and r.genus == 1
        return mesh_to_points_metrics(m.vertices.detach().double(), m.faces, ev_p.double(), ev_n.double(),
                                      n_points=60000, threshold=0.01)

    ours, mc = quality(rep.extract()), quality(marching_cubes(s))
    assert ours.normal_consistency > mc.normal_consistency + 0.03, (ours, mc)
    assert ours.normals_off_5deg < 0.6 * mc.normals_off_5deg, (ours, mc)
    assert ours.chamfer_l1 < 0.8 * mc.chamfer_l1, (ours, mc)


def test_scene_weights_are_the_library_weights():
    """One definition: the scene's task.weights section is LossWeights' fields (defaults and
    bounds) plus the staged runner's chamfer_final_stage_only."""
    import dataclasses

    from diffworld.tasks.reconstruction.config import WeightsConfig

    lib = {f.name: f.default for f in dataclasses.fields(LossWeights)}
    cfg = WeightsConfig()
    assert set(WeightsConfig.model_fields) == set(lib) | {"chamfer_final_stage_only"}
    assert {k: getattr(cfg, k) for k in lib} == {k: getattr(LossWeights(), k) for k in lib}
    for bad in (dict(chamfer=-1.0), dict(sdf_sign_until=1.5), dict(sign_band=0.0)):
        with pytest.raises(ValueError):
            LossWeights(**bad)
        with pytest.raises(ValueError):
            WeightsConfig(**bad)


def test_marching_tets_grid_losses_match_finite_differences_and_it_refines():
    """The marching-tets representation: the Chamfer and mesh-normal terms on its mesh w.r.t. the
    node values (float64, random directions), and refinement keeps its class and its surface."""
    from diffworld.geometry.reconstruction import LossWeights, MarchingTetsGrid

    gen = torch.Generator().manual_seed(0)
    s = sample_grid(Sphere(0.3), Grid.make(8, B), dtype=torch.float64)
    rep = MarchingTetsGrid(s + 0.01 * torch.randn(s.shape, generator=gen, dtype=torch.float64), B)
    pts, nrm = shapes.surface_points(Sphere(0.32), 400, B, dtype=torch.float64)
    target = ReconstructionTarget(pts, nrm, True)
    w = LossWeights(chamfer=1.0, mesh_normal=1.0, surface=1.0, normal=1.0, eikonal=1.0, sign=0.0)

    def loss(values):
        rep.values = values
        total, _ = reconstruction_losses(rep, target, w, 300, torch.Generator().manual_seed(1))
        return total

    for c in directional_check(loss, [rep.values.detach().clone().requires_grad_()], eps=1e-6, n_dirs=3, seed=2):
        assert abs(c.numeric) > 1e-6 and c.rel_error < 1e-6, c
    fine = rep.upsampled(16)
    assert isinstance(fine, MarchingTetsGrid)
    m = fine.extract()
    r = m.vertices.detach().norm(dim=1)
    assert mesh_report(m.vertices, m.faces).watertight and float((r - 0.3).abs().max()) < 0.03
