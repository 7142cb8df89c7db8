"""The constrained re-fill of bad tet regions: positive tets, the same boundary and volume,
Steiner points where no fill without them exists, and clear reasons where none exists."""

import numpy as np
import pytest

from diffworld.geometry import tet_remesh
from diffworld.geometry.tet_remesh import remesh_bad_regions

pytestmark = pytest.mark.skipif(not tet_remesh.tetgen_available(), reason="needs diffworld[tets] (TetGen)")


def _vol6(pos, tets):
    p = pos[tets]
    return np.linalg.det(p[:, 1:] - p[:, :1])


def _boundary_set(tets):
    return {tuple(sorted(f)) for f in tet_remesh._boundary(tets).tolist()}


def _fan(pos, faces, apex):
    """Tets fanning outward surface triangles from vertex ``apex``."""
    return np.concatenate([np.full((faces.shape[0], 1), apex), faces], 1)


def _cube():
    pos = np.array([[x, y, z] for z in (0, 1) for y in (0, 1) for x in (0, 1)], dtype=np.float64)
    quads = [(0, 2, 3, 1), (4, 5, 7, 6), (0, 1, 5, 4), (2, 6, 7, 3), (0, 4, 6, 2), (1, 3, 7, 5)]  # outward
    faces = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    return pos, faces


def _schoenhardt(twist=np.radians(30)):
    """Schoenhardt's twisted prism (outward faces): it has no tetrahedralization without a
    point inside."""
    ang = np.radians([90, 210, 330])
    bottom = np.stack([np.cos(ang), np.sin(ang), np.zeros(3)], 1)
    top = np.stack([np.cos(ang + twist), np.sin(ang + twist), np.full(3, 1.5)], 1)
    pos = np.concatenate([bottom, top])
    faces = [(0, 2, 1), (3, 4, 5)]
    for i in range(3):
        j = (i + 1) % 3
        # Each side quad (i, j, j+3, i+3) split along the diagonal that makes its edge reflex.
        faces += [(i, j, j + 3), (i, j + 3, i + 3)]
    return pos, np.array(faces)


def test_cube_fan_from_a_point_outside_is_refilled():
    pos, faces = _cube()
    centre = np.array([[0.5, 0.5, 1.6]])  # above the top face: the top's fan tets are inverted
    pos = np.concatenate([pos, centre])
    tets = _fan(pos, faces, 8)
    assert (_vol6(pos, tets) <= 0).any()
    r = remesh_bad_regions(pos, tets, first_free=8, floor=1e-9)
    assert r.fixed and r.reason == "" and r.region_tets == 12
    assert (_vol6(np.concatenate([pos, r.steiner]), r.tets) > 0).all()
    assert _vol6(np.concatenate([pos, r.steiner]), r.tets).sum() == pytest.approx(6.0, rel=1e-12)
    assert _boundary_set(r.tets) == {tuple(sorted(f)) for f in faces.tolist()}


def test_schoenhardt_prism_needs_and_gets_a_steiner_point():
    pos, faces = _schoenhardt()
    # Its kernel holds points near the axis: a fan from there is valid, so check the setup.
    good = np.concatenate([pos, [[0.0, 0.0, 0.75]]])
    assert (_vol6(good, _fan(good, faces, 6)) > 0).all()
    bad = np.concatenate([pos, [[0.0, 2.0, 0.75]]])  # outside the kernel
    tets = _fan(bad, faces, 6)
    assert (_vol6(bad, tets) <= 0).any()
    r = remesh_bad_regions(bad, tets, first_free=6, floor=1e-9)
    assert r.fixed and r.steiner.shape[0] >= 1
    all_pos = np.concatenate([bad, r.steiner])
    assert (_vol6(all_pos, r.tets) > 0).all()
    assert _boundary_set(r.tets) == {tuple(sorted(f)) for f in faces.tolist()}
    assert _vol6(all_pos, r.tets).sum() == pytest.approx(_vol6(good, _fan(good, faces, 6)).sum(), rel=1e-9)
    assert all(np.array_equal(a, np.arange(6)) for a in r.steiner_anchors)


def test_only_the_bad_region_changes():
    # Two cubes side by side (x in [0, 1] and [1, 2]), each fanned from its own centre; the
    # first centre is pushed through the shared wall into the second cube. Its star's boundary
    # is the first cube, which is embedded: that is refilled, the second cube's tets stay.
    pos, faces = _cube()
    pos2 = pos + [1.0, 0.0, 0.0]
    allpos = np.concatenate([pos, pos2, [[1.3, 0.5, 0.5], [1.5, 0.5, 0.5]]])
    t1 = _fan(allpos, faces, 16)
    t2 = _fan(allpos, faces + 8, 17)
    tets = np.concatenate([t1, t2])
    r = remesh_bad_regions(allpos, tets, first_free=16, floor=1e-9)
    assert r.fixed and (_vol6(np.concatenate([allpos, r.steiner]), r.tets) > 0).all()
    kept = {tuple(x) for x in r.tets.tolist()}
    assert all(tuple(t) in kept for t in t2.tolist()) and r.region_tets == 12


def test_self_intersecting_surface_is_reported():
    pos, faces = _cube()
    # A second cube overlapping the first, both fanned from points above them: the region
    # holds both stars, and its boundary (the two cubes' surfaces) crosses itself.
    pos2 = pos + 0.5
    allpos = np.concatenate([pos, pos2, [[0.5, 0.5, 1.7], [1.0, 1.0, 2.2]]])
    tets = np.concatenate([_fan(allpos, faces, 16), _fan(allpos, faces + 8, 17)])
    r = remesh_bad_regions(allpos, tets, first_free=16, floor=1e-9)
    assert not r.fixed and "intersects itself" in r.reason and r.region_tets == 0
    assert r.tets is tets


def test_without_tetgen_the_reason_says_what_to_install(monkeypatch):
    pos, faces = _cube()
    pos = np.concatenate([pos, [[0.5, 0.5, 1.6]]])
    tets = _fan(pos, faces, 8)
    monkeypatch.setattr(tet_remesh, "tetgen_available", lambda: False)
    r = remesh_bad_regions(pos, tets, first_free=8, floor=1e-9)
    assert not r.fixed and "diffworld[tets]" in r.reason


def test_good_mesh_is_returned_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pos, faces = _cube()
    pos = np.concatenate([pos, [[0.5, 0.5, 0.5]]])
    tets = _fan(pos, faces, 8)
    r = remesh_bad_regions(pos, tets, first_free=8, floor=1e-9)
    assert r.fixed and r.tets is tets and r.region_tets == 0
    assert list(tmp_path.iterdir()) == []  # TetGen's scratch files never land in the working folder
