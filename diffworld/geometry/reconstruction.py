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
* ``sign``: away from the target (more than a margin ``m`` of a quarter cell), the field must
  have the sign of the side of the nearest target point's oriented normal and at least its
  distance minus the margin: ``relu((d - m) - sign * s)^2`` over grid nodes (random box points
  for a neural field), optionally only within ``sign_band`` cells of the target (open targets:
  far from an open surface the side of its nearest point says nothing). This is what removes the
  remnants of the initial sphere and opens holes; it needs oriented normals. FlexiCubes nodes
  are measured where they are undeformed (an offset is at most half a cell): a wider margin
  for them lets single nodes near sharp edges flip and leaves one-cube floaters, which the
  mesh terms cannot see (a shrinking bubble gets ever fewer samples).

Terms of the mesh-based representations (FlexiCubes, G-Shell), computed on the mesh extracted in
training mode (:class:`FlexiCubesGrid`, :class:`GShellGrid`):

* ``mesh_normal``: ``1 - cos`` between the normals of the mesh samples and of their nearest
  target points, both directions (``1 - |cos|`` with unoriented target normals); oriented, an
  inside-out sliver (a floater hugging the surface) costs 2 where ``|cos|`` would not see it;
* ``dev``: FlexiCubes' L_dev (mean over (dual vertex, cut edge) pairs) in cells;
* ``sdf_sign``: the sign regularizer :func:`~diffworld.geometry.flexicubes.sdf_sign_loss` over the
  grid, optionally decayed linearly to ``sdf_sign_final`` over the first ``sdf_sign_until`` of
  each stage (the FlexiCubes reference fit: 0.2 -> 0.01 over the first quarter);
* ``weight_norm``: mean ``|raw|`` of the 21 weights (beta, alpha, gamma) of the surface cubes;
* ``msdf_negative``, ``msdf_positive`` (G-Shell): :func:`~diffworld.geometry.gshell.msdf_regularizers`
  on the template vertices, supervised = within ``msdf_radius`` of a target point (and, with
  normals, within ``msdf_tangential`` of its normal line: not past the edge of an open target).

Chamfer alone from a sphere leaves double layers and extra handles; the field terms at the
target points pin the sign on both sides of the surface, which recovers the topology.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

import torch

from diffworld.geometry.flexicubes import FlexiCubesMesh, flexicubes, sdf_sign_loss
from diffworld.geometry.grid import Grid, trilinear, trilinear_gradient
from diffworld.geometry.gshell import GShellMesh, gshell_flexicubes, msdf_regularizers, msdf_supervision
from diffworld.geometry.marching_cubes import IsoSurface, marching_cubes, marching_cubes_field
from diffworld.geometry.metrics import chamfer_terms

__all__ = [
    "FlexiCubesGrid",
    "GShellGrid",
    "GridSDF",
    "LossWeights",
    "MarchingTetsGrid",
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


@pydantic_dataclass(frozen=True)
class LossWeights:
    """Weights of the reconstruction loss terms (0 disables a term; see the module docstring).

    The one definition of the weights: the scene format's ``task.weights`` section is generated
    from these fields (defaults, bounds and descriptions), and construction checks the bounds.
    The last group only applies to :class:`FlexiCubesGrid` / :class:`GShellGrid` (the msdf terms
    to :class:`GShellGrid`); other representations ignore them.
    """

    chamfer: float = Field(0.0, ge=0, le=1e6, description="Mesh-sample Chamfer (squared cells).")
    surface: float = Field(1.0, ge=0, le=1e6, description="Field at target points (squared cells).")
    normal: float = Field(1.0, ge=0, le=1e6, description="1 - cos(field gradient, target normal).")
    eikonal: float = Field(1.0, ge=0, le=1e6, description="(|grad s| - 1)^2.")
    smoothness: float = Field(0.0, ge=0, le=1e6, description="Squared Laplacian (grids).")
    sign: float = Field(1.0, ge=0, le=1e6, description="Side of the nearest oriented target point, beyond a margin.")
    sign_band: Optional[float] = Field(None, gt=0, description="Sign term only within this many cells of the "
                                                               "target (None: everywhere; open targets need one).")
    mesh_normal: float = Field(0.0, ge=0, le=1e6, description="1 - cos of mesh-sample vs nearest target normals (1 - |cos| "
                                                      "for unoriented normals).")
    dev: float = Field(0.0, ge=0, le=1e6, description="FlexiCubes L_dev [cells] (flexicubes, gshell).")
    sdf_sign: float = Field(0.0, ge=0, le=1e6, description="FlexiCubes SDF sign regularizer (BCE over cut grid edges; "
                                                   "flexicubes, gshell).")
    sdf_sign_final: Optional[float] = Field(None, ge=0, le=1e6, description="Decay sdf_sign linearly to this weight "
                                                                    "(None: constant).")
    sdf_sign_until: float = Field(0.25, gt=0, le=1, description="Fraction of each stage over which sdf_sign "
                                                                "decays to sdf_sign_final.")
    weight_norm: float = Field(0.0, ge=0, le=1e6, description="Mean |raw| of the surface cubes' FlexiCubes weights "
                                                      "(flexicubes, gshell).")
    msdf_negative: float = Field(0.0, ge=0, le=1e6, description="Push msdf to -eps on template vertices no target point "
                                                        "supervises (gshell).")
    msdf_positive: float = Field(0.0, ge=0, le=1e6, description="Push msdf to +eps on supervised template vertices (gshell).")

    def sdf_sign_at(self, progress: float) -> float:
        """The ``sdf_sign`` weight at a fraction ``progress`` in [0, 1] of a stage."""
        if self.sdf_sign_final is None:
            return self.sdf_sign
        t = min(1.0, max(0.0, progress) / self.sdf_sign_until)
        return self.sdf_sign + (self.sdf_sign_final - self.sdf_sign) * t

    def uses_mesh(self) -> bool:
        """Whether any term needs the extracted mesh."""
        return bool(self.chamfer or self.mesh_normal or self.dev or self.weight_norm
                    or self.msdf_negative or self.msdf_positive)


class GridSDF:
    """Signed-distance values on a node grid, the optimized parameter of grid reconstruction.

    Args:
        values: Node values, shape (nx+1, ny+1, nz+1), negative inside.
        bounds: Box of the grid [m].
    """

    #: Nodes within this many cells of the target are left to the surface terms by the sign term.
    sign_margin = 0.25

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

    def extract(self, training: bool = False) -> IsoSurface:
        """Marching cubes of the node values (``training`` is accepted for a common interface:
        marching cubes has a single mode)."""
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
        return GridSDF(_upsample(self.values, resolution), self.bounds)


class MarchingTetsGrid(GridSDF):
    """An SDF grid extracted with marching tetrahedra (DMTet's template: every cube split into 6
    tets, :func:`~diffworld.geometry.marching_tets.marching_tets`); the vertices are the linear
    zero crossings on cut edges, differentiable w.r.t. the node values directly."""

    def extract(self, training: bool = False):
        from diffworld.geometry.marching_tets import marching_tets

        return marching_tets(self.values, self.bounds)

    def upsampled(self, resolution: int) -> "MarchingTetsGrid":
        return MarchingTetsGrid(_upsample(self.values, resolution), self.bounds)


class FlexiCubesGrid(GridSDF):
    """An SDF grid extracted with FlexiCubes: node values, per-cube weights and node offsets.

    The weights are dense per-cube tensors of *raw* values (FlexiCubes normalizes them: beta and
    alpha ``1 + 0.99 tanh(raw)``, gamma ``0.99 sigmoid(raw) + 0.005``); zero raw weights and zero
    offsets give the plain dual mesh, so a fresh grid starts there. Dense storage costs
    ``21 (nx ny nz) + 3 (nx+1)(ny+1)(nz+1)`` numbers (25 MB in float32 at 64^3, three times that
    with Adam's state); FlexiCubes reads only the surface cubes' rows.

    Args:
        values: Node values [m], shape (nx+1, ny+1, nz+1), negative inside.
        bounds: Box of the grid [m].
        beta: Raw edge weights (nx, ny, nz, 12), or None for zeros.
        alpha: Raw corner weights (nx, ny, nz, 8), or None for zeros.
        gamma: Raw split weights (nx, ny, nz), or None for zeros.
        deform: Raw node offsets (nx+1, ny+1, nz+1, 3) (FlexiCubes moves a node by
            ``(0.5 - 1e-8) h tanh(raw)``: at most half a cell), or None for zeros.
        learn_weights: Optimize beta, alpha, gamma (else they stay as given).
        learn_deform: Optimize the node offsets.
    """

    def __init__(self, values: torch.Tensor, bounds, *, beta: torch.Tensor | None = None,
                 alpha: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
                 deform: torch.Tensor | None = None, learn_weights: bool = True, learn_deform: bool = True) -> None:
        super().__init__(values, bounds)
        res = tuple(int(n) - 1 for n in values.shape)
        self.learn_weights, self.learn_deform = bool(learn_weights), bool(learn_deform)

        def leaf(name, given, shape, learn):
            if given is None:
                given = values.new_zeros(shape)
            elif tuple(given.shape) != shape:
                raise ValueError(f"'{name}': expected shape {shape}, got {tuple(given.shape)}")
            return given.detach().to(values).clone().requires_grad_(learn)

        self.beta = leaf("beta", beta, (*res, 12), self.learn_weights)
        self.alpha = leaf("alpha", alpha, (*res, 8), self.learn_weights)
        self.gamma = leaf("gamma", gamma, res, self.learn_weights)
        self.deform = leaf("deform", deform, (*values.shape, 3), self.learn_deform)

    def parameters(self) -> dict[str, torch.Tensor]:
        out = {"sdf": self.values}
        if self.learn_weights:
            out.update(beta=self.beta, alpha=self.alpha, gamma=self.gamma)
        if self.learn_deform:
            out["deform"] = self.deform
        return out

    def parameter_groups(self, field_lr: float, weights_lr: float, deform_lr: float) -> list[dict]:
        """Optimizer groups: node fields at ``field_lr`` [m/step], raw weights and raw offsets at
        their own rates (raw units per step)."""
        p = self.parameters()
        groups = [{"params": {k: p[k] for k in ("sdf", "msdf") if k in p}, "lr": field_lr}]
        if self.learn_weights:
            groups.append({"params": {k: p[k] for k in ("beta", "alpha", "gamma")}, "lr": weights_lr})
        if self.learn_deform:
            groups.append({"params": {"deform": p["deform"]}, "lr": deform_lr})
        return groups

    def _flexicubes_kwargs(self, training: bool) -> dict:
        # Untrained weights are passed as None: FlexiCubes then skips their gathers.
        kw: dict = {"training": training}
        if self.learn_weights or bool(self.beta.detach().any() or self.alpha.detach().any()
                                      or self.gamma.detach().any()):
            kw.update(beta=self.beta, alpha=self.alpha, gamma=self.gamma)
        if self.learn_deform or bool(self.deform.detach().any()):
            kw["deform"] = self.deform
        return kw

    def extract(self, training: bool = False) -> FlexiCubesMesh:
        """FlexiCubes surface: 4 triangles per quad around a gamma-weighted centre with
        ``training`` (differentiable in gamma), else 2 (the split chosen by gamma)."""
        return flexicubes(self.values, self.bounds, **self._flexicubes_kwargs(training))

    def weight_norm(self, cubes: torch.Tensor) -> torch.Tensor:
        """Mean ``|raw|`` of the 21 weights of the given cubes (M, 3) int64 (the surface cubes).

        Only surface cubes are counted: elsewhere the weights do nothing, and a mean over the
        whole volume would shrink the term with the resolution.
        """
        if cubes.shape[0] == 0:
            return self.beta.sum() * 0.0
        i, j, k = cubes.unbind(1)
        raw = torch.cat([self.beta[i, j, k], self.alpha[i, j, k], self.gamma[i, j, k][:, None]], 1)
        return raw.abs().mean()

    def project(self) -> None:
        """Keep the boundary nodes outside and remove single-node specks (called under no_grad
        after every step).

        FlexiCubes needs a closed template: a boundary node pushed inside by a step would stop
        the run. The floor is a hundredth of a cell, below anything the fit cares about.

        A node whose 6 neighbours all lie on the other side of the surface makes a closed
        octahedron-like piece of 8-12 triangles around it: an enclosed void or a floater smaller
        than a cell, which no target resolved on this grid has. They appear where the sign term
        leaves nodes free (within its margin of sharp edges) and nothing else pulls them back (the
        piece is within a cell of the target, so Chamfer barely sees it). Such a node takes the
        mean of its neighbours' values (strictly their side).
        """
        floor = 0.01 * self.cell
        v = self.values
        for a in range(3):
            for idx in (0, v.shape[a] - 1):
                face = v.select(a, idx)
                face.clamp_(min=floor)
        inside = v < 0
        core = (slice(1, -1),) * 3
        n_same = torch.zeros_like(inside[core], dtype=torch.int64)
        n_sum = torch.zeros_like(v[core])
        for a in range(3):
            for step in (-1, 1):
                nb = tuple(slice(1 + step, v.shape[d] - 1 + step) if d == a else slice(1, -1) for d in range(3))
                n_same += inside[nb] == inside[core]
                n_sum += v[nb]
        speck = n_same == 0
        if bool(speck.any()):
            v[core][speck] = n_sum[speck] / 6

    def _upsampled_fields(self, resolution: int) -> dict[str, torch.Tensor]:
        return {"values": _upsample(self.values, resolution)}

    def upsampled(self, resolution: int) -> "FlexiCubesGrid":
        """The same field on a finer grid; weights and offsets start again from zero.

        Per-cube weights and node offsets are in units of the cell they belong to: a coarse
        cube's weights say nothing about its 8 children, and the trilinear field keeps the shape.
        """
        return type(self)(**self._upsampled_fields(resolution), bounds=self.bounds, **self._options())

    def _options(self) -> dict:
        return {"learn_weights": self.learn_weights, "learn_deform": self.learn_deform}


class GShellGrid(FlexiCubesGrid):
    """G-Shell on FlexiCubes: an SDF grid (the watertight template) and a manifold-SDF grid.

    The open surface is the part of the template where ``msdf > 0``
    (:func:`~diffworld.geometry.gshell.gshell_flexicubes`). Both fields are optimized, with the
    FlexiCubes weights and offsets of :class:`FlexiCubesGrid`.

    Args:
        values: Template node values [m], shape (nx+1, ny+1, nz+1), negative inside.
        msdf: Manifold SDF at the nodes [m], same shape.
        bounds: Box of the grid [m].
        msdf_eps: Margin of the msdf regularizers [m] (> 0).
        msdf_radius: A template vertex within this distance [m] of a target point is supervised.
        msdf_tangential: With target normals, a supervised vertex must also be within this
            distance [m] of the nearest point's normal line (None: distance test only); see
            :func:`~diffworld.geometry.gshell.msdf_supervision`.
        **kwargs: :class:`FlexiCubesGrid` options.
    """

    def __init__(self, values: torch.Tensor, msdf: torch.Tensor, bounds, *, msdf_eps: float,
                 msdf_radius: float, msdf_tangential: float | None = None, **kwargs) -> None:
        if tuple(msdf.shape) != tuple(values.shape):
            raise ValueError(f"'msdf': expected the shape of 'values' {tuple(values.shape)}, got {tuple(msdf.shape)}")
        super().__init__(values, bounds, **kwargs)
        self.msdf = msdf.detach().to(values).clone().requires_grad_(True)
        self.msdf_eps, self.msdf_radius = float(msdf_eps), float(msdf_radius)
        self.msdf_tangential = None if msdf_tangential is None else float(msdf_tangential)
        self._supervision = None  # (target points, KD-tree) built once per target

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"sdf": self.values, "msdf": self.msdf, **{k: v for k, v in super().parameters().items() if k != "sdf"}}

    def extract(self, training: bool = False) -> GShellMesh:
        """The open surface (``training`` as in :meth:`FlexiCubesGrid.extract`)."""
        return gshell_flexicubes(self.values, self.msdf, self.bounds, **self._flexicubes_kwargs(training))

    def msdf_terms(self, mesh: GShellMesh, target_points: torch.Tensor, target_normals: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The msdf regularizers on the template vertices of ``mesh`` (negative, positive)."""
        t = mesh.template
        hit = self._supervision
        if hit is None or hit[0] is not target_points:
            from scipy.spatial import cKDTree

            self._supervision = (target_points, cKDTree(target_points.detach().cpu().numpy()))
        supervised = msdf_supervision(t.vertices, target_points, self.msdf_radius, target_normals=target_normals,
                                      tangential=self.msdf_tangential, tree=self._supervision[1])
        reg = msdf_regularizers(t.attributes[:, 0], supervised, self.msdf_eps)
        return reg.negative, reg.positive

    def _upsampled_fields(self, resolution: int) -> dict[str, torch.Tensor]:
        return {"values": _upsample(self.values, resolution), "msdf": _upsample(self.msdf, resolution)}

    def _options(self) -> dict:
        return {**super()._options(), "msdf_eps": self.msdf_eps, "msdf_radius": self.msdf_radius,
                "msdf_tangential": self.msdf_tangential}


def _upsample(values: torch.Tensor, resolution: int) -> torch.Tensor:
    """Node values on a finer grid over the same box (trilinear: the zero set is kept)."""
    with torch.no_grad():
        size = (resolution + 1,) * 3
        return torch.nn.functional.interpolate(values[None, None], size=size, mode="trilinear",
                                               align_corners=True)[0, 0]


class NeuralSDFRepresentation:
    """A torch network as the field; extraction through the DeepMesh gradient.

    Args:
        network: Module mapping points (N, 3) to values (N,) or (N, 1).
        resolution: Extraction grid resolution.
        bounds: Box [m].
    """

    sign_margin = 0.25  # cells, as for grids

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

    def extract(self, training: bool = False) -> IsoSurface:
        """Marching cubes of the network with the DeepMesh gradient (``training``: unused)."""
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


def _mesh_to_target(points: torch.Tensor, normals: torch.Tensor, target: torch.Tensor,
                    target_normals: torch.Tensor | None, oriented: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Symmetric squared Chamfer [m^2] between mesh samples and target points, and the normal
    term over the same nearest-neighbour pairs: ``1 - cos`` with oriented target normals (an
    inside-out sliver costs 2, not 0 as with ``|cos|``), else ``1 - |cos|``
    (:func:`~diffworld.geometry.metrics.chamfer_terms`).

    Args:
        points: Mesh samples (N, 3) [m], differentiable; ``normals`` their unit face normals (N, 3).
        target: Target points (M, 3) [m]; ``target_normals`` (M, 3) or None (no normal term).
        oriented: Whether the target normals point outwards.
    """
    to_target, to_points, normal = chamfer_terms(points, target, normals, target_normals, oriented)
    return to_target + to_points, normal


def reconstruction_losses(rep, target: ReconstructionTarget, weights: LossWeights, n_samples: int,
                          generator: torch.Generator, progress: float = 0.0, mesh_terms=None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its weighted-in terms for one iteration.

    Args:
        rep: :class:`GridSDF`, :class:`FlexiCubesGrid`, :class:`GShellGrid` or
            :class:`NeuralSDFRepresentation`.
        target: Target points/normals.
        weights: Term weights.
        n_samples: Points sampled on the extracted mesh and drawn from the target per iteration.
        generator: CPU generator for the sampling (determinism).
        progress: Fraction of the stage done, in [0, 1] (for the ``sdf_sign`` schedule).
        mesh_terms: Optional ``f(mesh) -> {name: (weight, value)}``: more terms on the extracted
            mesh (``vertices``, ``faces``; for G-Shell also its ``template``): the image losses of
            image targets (the renderer lives elsewhere).

    Returns:
        ``(total, terms)``; terms are unweighted values for logging.
    """
    from diffworld.geometry.sampling import sample_surface

    pts, nrm = target.points, target.normals
    m = pts.shape[0]
    idx = torch.randperm(m, generator=generator)[: min(n_samples, m)].to(pts.device)
    p, n = pts[idx], (nrm[idx] if nrm is not None else None)
    h = rep.cell
    h2 = h ** 2
    terms: dict[str, torch.Tensor] = {}
    flexible = isinstance(rep, FlexiCubesGrid)
    extra: dict[str, float] = {}
    if weights.uses_mesh() or mesh_terms is not None:
        # Training mode: FlexiCubes' 4-triangle split is differentiable in gamma.
        mesh = rep.extract(training=True)
        with_normals = bool(weights.mesh_normal) and n is not None
        if weights.chamfer or with_normals:
            samples = sample_surface(mesh.vertices, mesh.faces, n_samples, generator=generator)
            if samples.points.shape[0] > 0:
                dist2, normal = _mesh_to_target(samples.points, samples.normals, p, n if with_normals else None,
                                                target.oriented)
                terms["chamfer"] = dist2 / h2
                if with_normals:
                    terms["mesh_normal"] = normal
            else:  # nothing extracted yet: the field terms alone must create a surface
                zero = mesh.vertices.sum() * 0.0
                terms["chamfer"] = zero
                if with_normals:
                    terms["mesh_normal"] = zero
        if flexible:
            fc = mesh.template if isinstance(mesh, GShellMesh) else mesh
            if weights.dev:
                terms["dev"] = fc.l_dev.mean() / h if fc.l_dev.numel() else fc.vertices.sum() * 0.0
            if weights.weight_norm:
                terms["weight_norm"] = rep.weight_norm(fc.cubes)
        if isinstance(rep, GShellGrid) and (weights.msdf_negative or weights.msdf_positive):
            terms["msdf_negative"], terms["msdf_positive"] = rep.msdf_terms(mesh, pts, nrm)
        if mesh_terms is not None:
            for name, (w, value) in mesh_terms(mesh).items():
                terms[name], extra[name] = value, w
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
        # Within the margin of a target point the sign is left to the surface and normal terms
        # (sharp features); beyond it, the node must be on the right side by d - margin.
        margin = rep.sign_margin * h
        use = dist > margin
        if weights.sign_band is not None:
            use = use & (dist < weights.sign_band * h)
        if bool(use.any()):
            terms["sign"] = torch.relu((dist[use] - margin) - sgn[use] * values[use]).pow(2).mean() / h2
    if weights.eikonal:
        terms["eikonal"] = rep.eikonal()
    if weights.smoothness:
        terms["smoothness"] = rep.smoothness()
    scale = {k: extra[k] if k in extra else getattr(weights, k) for k in terms}
    if flexible and weights.sdf_sign_at(progress):
        terms["sdf_sign"] = sdf_sign_loss(rep.values)
        scale["sdf_sign"] = weights.sdf_sign_at(progress)
    total = sum(scale[k] * v for k, v in terms.items())
    return total, terms
