"""Surface reconstruction through a differentiable isosurface.

A representation (an SDF grid, refined coarse to fine, or a neural SDF) is fitted to target
points (with or without normals). Losses, each in units that make weight 1 a sensible default:

* ``chamfer``: symmetric squared distance between points sampled differentiably on the extracted
  mesh and the target points, divided by the squared cell size (pulls the extracted surface);
* ``surface``: field value at the target points, squared, over the squared cell size;
* ``normal``: field gradient direction vs target normals at the target points (``1 - cos`` with
  oriented normals, ``1 - |cos|`` with unoriented ones);
* ``eikonal``: ``(|grad s| - 1)^2`` over the grid (or random points for a neural field): keeps
  the field a distance, which is what stops double layers and floaters;
* ``smoothness``: squared Laplacian of the grid (grids only);
* ``sign``: away from the target (more than half a cell), the field must have the sign of the
  side of the nearest target point's oriented normal and at least its distance minus half a cell:
  ``relu((d - h/2) - sign * s)^2`` over grid nodes (random box points for a neural field). This is
  what removes the remnants of the initial sphere and opens holes; it needs oriented normals.

Chamfer alone from a sphere leaves double layers and extra handles; the field terms at the
target points pin the sign on both sides of the surface, which recovers the topology.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from diffworld.geometry.grid import Grid, trilinear, trilinear_gradient
from diffworld.geometry.marching_cubes import IsoSurface, marching_cubes, marching_cubes_field

__all__ = [
    "GridSDF",
    "LossWeights",
    "NeuralSDFRepresentation",
    "ReconstructionTarget",
    "reconstruction_losses",
]


class ReconstructionTarget(NamedTuple):
    """What to reconstruct.

    Attributes:
        points: Target surface points [m], shape (M, 3).
        normals: Unit normals (M, 3), or None.
        oriented: Whether ``normals`` point outwards (False: estimated, sign unknown).
    """

    points: torch.Tensor
    normals: torch.Tensor | None
    oriented: bool = True


@dataclass
class LossWeights:
    """Weights of the reconstruction loss terms (0 disables a term)."""

    chamfer: float = 1.0
    surface: float = 1.0
    normal: float = 0.1
    eikonal: float = 0.1
    smoothness: float = 0.0
    sign: float = 1.0


class GridSDF:
    """Signed-distance values on a node grid, the optimized parameter of grid reconstruction.

    Args:
        values: Node values, shape (nx+1, ny+1, nz+1), negative inside.
        bounds: Box of the grid [m].
    """

    def __init__(self, values: torch.Tensor, bounds) -> None:
        self.bounds = (tuple(bounds[0]), tuple(bounds[1]))
        self.values = values.detach().clone().requires_grad_(True)
        self._nodes: torch.Tensor | None = None  # node positions, built on first use
        self._side = None  # (target points, nodes, (side, distance)) for the sign term

    @staticmethod
    def from_field(field: Callable[[torch.Tensor], torch.Tensor], resolution: int, bounds,
                   dtype=torch.float32, device="cpu") -> "GridSDF":
        """Sample a torch field (e.g. the initial sphere) on the grid."""
        grid = Grid.make(resolution, bounds)
        with torch.no_grad():
            v = field(grid.nodes(device, dtype).reshape(-1, 3)).reshape(grid.shape)
        return GridSDF(v, bounds)

    @property
    def grid(self) -> Grid:
        return Grid.from_values(self.values, self.bounds)

    @property
    def cell(self) -> float:
        return min(self.grid.spacing)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"sdf": self.values}

    def extract(self) -> IsoSurface:
        return marching_cubes(self.values, self.bounds)

    def field(self, points: torch.Tensor) -> torch.Tensor:
        return trilinear(self.values, self.bounds, points)

    def field_gradient(self, points: torch.Tensor) -> torch.Tensor:
        return trilinear_gradient(self.values, self.bounds, points, 0.5 * self.cell)

    def eikonal(self) -> torch.Tensor:
        """Mean of (|grad s| - 1)^2 over the cells."""
        s = self.values
        h = self.grid.spacing
        # Forward differences at cell corners: unlike central differences they see the
        # odd-even (checkerboard) mode, which would otherwise grow unchecked.
        gx = (s[1:, :-1, :-1] - s[:-1, :-1, :-1]) / h[0]
        gy = (s[:-1, 1:, :-1] - s[:-1, :-1, :-1]) / h[1]
        gz = (s[:-1, :-1, 1:] - s[:-1, :-1, :-1]) / h[2]
        norm = torch.sqrt(gx * gx + gy * gy + gz * gz + 1e-12)
        return ((norm - 1.0) ** 2).mean()

    def smoothness(self) -> torch.Tensor:
        """Mean squared Laplacian over interior nodes, in units of 1/cell."""
        s = self.values
        lap = (s[2:, 1:-1, 1:-1] + s[:-2, 1:-1, 1:-1] + s[1:-1, 2:, 1:-1] + s[1:-1, :-2, 1:-1]
               + s[1:-1, 1:-1, 2:] + s[1:-1, 1:-1, :-2] - 6 * s[1:-1, 1:-1, 1:-1])
        return (lap / self.cell).pow(2).mean()

    def probe(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Points where the sign term is evaluated (all nodes) and the field values there."""
        if self._nodes is None:
            self._nodes = self.grid.nodes(self.values.device, self.values.dtype).reshape(-1, 3)
        return self._nodes, self.values.reshape(-1)

    def upsampled(self, resolution: int) -> "GridSDF":
        """The same field on a finer grid (trilinear, so the zero set is kept)."""
        with torch.no_grad():
            size = (resolution + 1,) * 3
            v = torch.nn.functional.interpolate(self.values[None, None], size=size, mode="trilinear",
                                                align_corners=True)[0, 0]
        return GridSDF(v, self.bounds)


class NeuralSDFRepresentation:
    """A torch network as the field; extraction through the DeepMesh gradient.

    Args:
        network: Module mapping points (N, 3) to values (N,) or (N, 1).
        resolution: Extraction grid resolution.
        bounds: Box [m].
    """

    def __init__(self, network: torch.nn.Module, resolution: int, bounds, dtype=torch.float32, device="cpu") -> None:
        self.network = network
        self.resolution = resolution
        self.bounds = (tuple(bounds[0]), tuple(bounds[1]))
        self.dtype, self.device = dtype, device
        self._gen = torch.Generator().manual_seed(0)

    @property
    def cell(self) -> float:
        return min(Grid.make(self.resolution, self.bounds).spacing)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {f"net.{k}": p for k, p in self.network.named_parameters()}

    def field(self, points: torch.Tensor) -> torch.Tensor:
        out = self.network(points)
        return out[:, 0] if out.dim() == 2 else out

    def extract(self) -> IsoSurface:
        return marching_cubes_field(self.field, self.resolution, self.bounds, dtype=self.dtype, device=self.device)

    def field_gradient(self, points: torch.Tensor) -> torch.Tensor:
        x = points.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.field(x).sum(), x, create_graph=True)
        return g

    def _box_points(self, n: int) -> torch.Tensor:
        lo = torch.tensor(self.bounds[0], dtype=self.dtype)
        hi = torch.tensor(self.bounds[1], dtype=self.dtype)
        return (lo + (hi - lo) * torch.rand((n, 3), generator=self._gen, dtype=self.dtype)).to(self.device)

    def probe(self) -> tuple[torch.Tensor, None]:
        """Random box points for the sign term (values evaluated by the caller)."""
        return self._box_points(8192), None

    def eikonal(self) -> torch.Tensor:
        """Mean of (|grad f| - 1)^2 at random box points."""
        g = self.field_gradient(self._box_points(4096))
        return ((g.norm(dim=-1) - 1.0) ** 2).mean()

    def smoothness(self) -> torch.Tensor:
        """Not defined for a network: zero (the eikonal term regularizes it)."""
        return torch.zeros((), dtype=self.dtype, device=self.device)


def _side_of_target(x: torch.Tensor, points: torch.Tensor, normals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign of the side of the nearest target point's normal (+1 outside), and the distance to it."""
    from scipy.spatial import cKDTree

    d, i = cKDTree(points.detach().cpu().numpy()).query(x.detach().cpu().numpy(), k=1)
    idx = torch.from_numpy(i).to(points.device)
    side = ((x.detach() - points[idx]) * normals[idx]).sum(-1)
    return torch.where(side >= 0, 1.0, -1.0).to(x.dtype), torch.from_numpy(d).to(x)


def _cached_side(rep, x: torch.Tensor, points: torch.Tensor, normals: torch.Tensor):
    """Grid nodes do not move within a stage: keep their side/distance on the representation."""
    if not isinstance(rep, GridSDF):
        return _side_of_target(x, points, normals)
    hit = rep._side
    if hit is None or hit[0] is not points or hit[1] is not x:
        rep._side = (points, x, _side_of_target(x, points, normals))
    return rep._side[2]


def reconstruction_losses(rep, target: ReconstructionTarget, weights: LossWeights, n_samples: int,
                          generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its weighted-in terms for one iteration.

    Args:
        rep: :class:`GridSDF` or :class:`NeuralSDFRepresentation`.
        target: Target points/normals.
        weights: Term weights.
        n_samples: Points sampled on the extracted mesh and drawn from the target per iteration.
        generator: CPU generator for the sampling (determinism).

    Returns:
        ``(total, terms)``; terms are unweighted values for logging.
    """
    from diffworld.geometry.metrics import chamfer_loss
    from diffworld.geometry.sampling import sample_surface

    pts, nrm = target.points, target.normals
    m = pts.shape[0]
    idx = torch.randperm(m, generator=generator)[: min(n_samples, m)].to(pts.device)
    p, n = pts[idx], (nrm[idx] if nrm is not None else None)
    h2 = rep.cell ** 2
    terms: dict[str, torch.Tensor] = {}
    if weights.chamfer:
        mesh = rep.extract()
        if mesh.faces.shape[0] > 0:
            samples = sample_surface(mesh.vertices, mesh.faces, n_samples, generator=generator)
            terms["chamfer"] = chamfer_loss(samples.points, p).total / h2
        else:  # nothing extracted yet: the field terms alone must create a surface
            terms["chamfer"] = mesh.vertices.sum() * 0.0
    if weights.surface:
        terms["surface"] = rep.field(p).pow(2).mean() / h2
    if weights.normal and n is not None:
        g = rep.field_gradient(p)
        cos = (g * n).sum(-1) / (g.norm(dim=-1) + 1e-9)
        terms["normal"] = (1.0 - cos).mean() if target.oriented else (1.0 - cos.abs()).mean()
    if weights.sign and n is not None and target.oriented:
        x, values = rep.probe()
        sgn, dist = _cached_side(rep, x, pts, nrm)
        if values is None:
            values = rep.field(x)
        # Within half a cell of a target point the sign is left to the surface and normal terms
        # (sharp features); beyond it, the node must be on the right side by d - h/2.
        half = 0.25 * rep.cell
        far = dist > half
        if bool(far.any()):
            terms["sign"] = torch.relu((dist[far] - half) - sgn[far] * values[far]).pow(2).mean() / h2
    if weights.eikonal:
        terms["eikonal"] = rep.eikonal()
    if weights.smoothness:
        terms["smoothness"] = rep.smoothness()
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    return total, terms
