"""Elastomer geometry of vision-based tactile sensors: a GelSight-type hemispherical dome and a
flat gripper pad, as FEM tet meshes with their contact surface and fixed base.

Units are SI throughout (the reference DiffTactile works in cm: its dome of inner radius 0.75 cm
with 4 node layers 0.25 cm apart is ``dome(inner_radius=7.5e-3, thickness=7.5e-3, layers=3)``
here).

The dome is built as a shell: a triangulation of the hemisphere (the convex hull of points on the
unit sphere is their spherical Delaunay triangulation, so its triangles are well shaped) is
extruded radially into prisms, one per triangle and layer, and each prism is split into 3 tets
with the diagonals of its side faces chosen by vertex index (each side quad's diagonal starts at
its smallest index). Two prisms sharing a side choose the same diagonal, so the mesh is
conforming, and the rule never gives a cyclic prism, so every prism splits. (The reference
tetrahedralizes scattered layer points with a Delaunay of (x, layer, z), whose slivers make
its explicit time step small.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import ConvexHull

from diffworld.sims.fem.mesh import TetMesh

__all__ = ["SensorGeometry", "dome", "flat_pad", "prism_tets"]


@dataclass(frozen=True)
class SensorGeometry:
    """An elastomer's mesh and the node and face sets a sensor needs.

    Attributes:
        mesh: The gel's rest tet mesh [m], in the sensor frame (the dome's centre, or the pad's
            base centre, at the origin; the contact side towards +z).
        contact_faces: (F, 3) int64 outward triangles of the contact surface (the dome's outer
            shell, the pad's top face): where objects touch and markers and the optical image live.
        base_nodes: (B,) int64 nodes bonded to the rigid sensor body (the dome's inner shell, the
            pad's bottom face): the kinematic set the sensor's pose drives.
    """

    mesh: TetMesh
    contact_faces: torch.Tensor
    base_nodes: torch.Tensor

    @property
    def contact_nodes(self) -> torch.Tensor:
        """(C,) int64 the nodes of the contact surface."""
        return torch.unique(self.contact_faces)


def prism_tets(bottom: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Split prisms into 3 tets each, conforming across shared sides.

    Args:
        bottom: (P, 3) int vertex ids of each prism's bottom triangle.
        top: (P, 3) int the ids above them, with ``top[i, j] > bottom[k, l]`` for every pair
            (the layer above is numbered after the layer below).

    Returns:
        (3P, 4) int64 tets, in no particular orientation.
    """
    order = np.argsort(bottom, axis=1)
    a, b, c = (np.take_along_axis(bottom, order[:, [j]], 1)[:, 0] for j in range(3))
    a1, b1, c1 = (np.take_along_axis(top, order[:, [j]], 1)[:, 0] for j in range(3))
    # With a < b < c below, every side quad's diagonal starts at its smaller bottom corner:
    # (a, b'), (a, c'), (b, c'); these 3 tets are the split with exactly those diagonals.
    return np.concatenate([np.stack([a, b, c, c1], 1), np.stack([a, b, b1, c1], 1),
                           np.stack([a, a1, b1, c1], 1)]).astype(np.int64)


def _hemisphere(n_points: int, n_rim: int) -> tuple[np.ndarray, np.ndarray]:
    """Points on the unit upper hemisphere (a Fibonacci spiral plus a ring of ``n_rim`` on the
    rim) and their outward triangulation (F, 3)."""
    golden = math.pi * (3.0 - math.sqrt(5.0))
    k = np.arange(n_points)
    # Heights uniform in z (equal areas per point on the sphere, Archimedes) over [gap, 1], so
    # the lowest spiral point stays about half a spacing above the rim ring (no tiny edges).
    gap = 0.5 * math.sqrt(2 * math.pi / n_points)
    z = gap + (1.0 - gap) * (1.0 - (k + 0.5) / n_points)
    r = np.sqrt(1.0 - z * z)
    spiral = np.stack([r * np.cos(golden * k), r * np.sin(golden * k), z], 1)
    t = 2 * math.pi * np.arange(n_rim) / n_rim
    rim = np.stack([np.cos(t), np.sin(t), np.zeros(n_rim)], 1)
    points = np.concatenate([rim, spiral])
    # The hull with the south pole added closes the surface; the triangles at the pole go.
    hull = ConvexHull(np.concatenate([points, [[0.0, 0.0, -1.0]]]))
    faces = hull.simplices[(hull.simplices < points.shape[0]).all(1)]
    # Orient outward (the hull's simplices are not consistently ordered).
    p = points[faces]
    normal = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    flip = (normal * p.mean(1)).sum(1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return points, faces


def dome(inner_radius: float = 7.5e-3, thickness: float = 7.5e-3, layers: int = 3,
         n_points: int = 200, n_rim: int | None = None) -> SensorGeometry:
    """A hemispherical gel shell (GelSight-type dome).

    Args:
        inner_radius: Radius of the shell's inner surface, bonded to the rigid dome [m].
        thickness: Shell thickness [m].
        layers: Tet layers through the thickness (layers + 1 node shells, equally spaced).
        n_points: Points of the hemisphere's triangulation (per node shell), rim excluded.
        n_rim: Points on the rim circle; default about the spiral's spacing around the rim.

    Returns:
        :class:`SensorGeometry`: contact faces on the outer shell, base nodes on the inner one.
        The open rim (z = 0) is a free boundary.

    Raises:
        ValueError: Non-positive sizes, counts under the minimum, or a shell so thin for its
            triangles that tets are degenerate (the message names the arguments and the tets).
    """
    for name, value in (("inner_radius", inner_radius), ("thickness", thickness)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"dome: '{name}' must be a positive length [m], got {value!r}")
    if int(layers) != layers or layers < 1:
        raise ValueError(f"dome: 'layers' must be an integer >= 1, got {layers!r}")
    if int(n_points) != n_points or n_points < 8:
        raise ValueError(f"dome: 'n_points' must be an integer >= 8, got {n_points!r}")
    # The spiral's spacing is about sqrt(2 pi / n) on the unit hemisphere.
    n_rim = int(n_rim) if n_rim is not None else max(8, round(2 * math.pi / math.sqrt(2 * math.pi / n_points)))
    unit, faces = _hemisphere(int(n_points), n_rim)
    n = unit.shape[0]
    radii = inner_radius + thickness * np.arange(layers + 1) / layers
    vertices = np.concatenate([unit * r for r in radii])
    tets = np.concatenate([prism_tets(faces + l * n, faces + (l + 1) * n) for l in range(layers)])
    try:
        mesh = TetMesh.from_arrays(torch.from_numpy(vertices), torch.from_numpy(tets), name="dome", orient=True)
    except ValueError as err:  # e.g. flat tets of a shell too thin for its triangles: say which arguments
        raise ValueError(f"dome: inner_radius {inner_radius:g} m, thickness {thickness:g} m, layers {layers}, "
                         f"n_points {n_points} give an unusable mesh: {err}") from None
    return SensorGeometry(mesh, torch.from_numpy(faces + layers * n).long(), torch.arange(n, dtype=torch.int64))


def flat_pad(size: tuple[float, float] = (0.02, 0.02), thickness: float = 4e-3,
             res: tuple[int, int, int] = (20, 20, 4)) -> SensorGeometry:
    """A flat gel pad (GelSight-style gripper finger): a box on the sensor body.

    Args:
        size: Pad extent along x and y [m], centred on the origin.
        thickness: Gel thickness along z [m]; the base is at z = 0, the contact face at z = thickness.
        res: Cells along x, y, z (each split into 6 tets).

    Returns:
        :class:`SensorGeometry`: contact faces on the top face, base nodes on the bottom face.

    Raises:
        ValueError: Non-positive sizes, a bad ``res``, or a pad so thin for its cells that tets are
            degenerate (the message names the arguments and the tets).
    """
    if len(size) != 2 or not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in size):
        raise ValueError(f"flat_pad: 'size' must be two positive lengths [m], got {size!r}")
    if not (isinstance(thickness, (int, float)) and math.isfinite(thickness) and thickness > 0):
        raise ValueError(f"flat_pad: 'thickness' must be a positive length [m], got {thickness!r}")
    sx, sy = size
    try:
        mesh = TetMesh.box((-sx / 2, -sy / 2, 0.0), (sx / 2, sy / 2, thickness), res)
    except ValueError as err:  # e.g. flat tets of a pad too thin for its cells: say which arguments
        raise ValueError(f"flat_pad: size {tuple(size)} m, thickness {thickness:g} m, res {tuple(res)} give an "
                         f"unusable mesh: {err}") from None
    faces = mesh.surface_faces()
    z = mesh.vertices[:, 2]
    tol = 1e-9 * thickness
    top = (z[faces] >= thickness - tol).all(1)
    base = torch.nonzero(z <= tol)[:, 0]
    return SensorGeometry(mesh, faces[top], base)
