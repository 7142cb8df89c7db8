"""Outputs of an ``mpm`` run: trajectory, pictures and movie (liquids drawn as surfaces), metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffworld.tasks.mpm.build import MPMScene
from diffworld.tasks.mpm.config import BODY_COLORS, MPMTask
from diffworld.tasks.mpm.objectives import LossTerms

__all__ = ["write_outputs", "write_patterns"]


def _liquid_bodies(task: MPMTask) -> list[int]:
    """Ids of the bodies and emitters (in that order) whose material is a liquid (law ``fluid``)."""
    from diffworld.sims.mpm.materials import MATERIALS

    return [i for i, b in enumerate([*task.bodies, *task.emitters]) if MATERIALS[b.material.name][0] == "fluid"]


class _SurfaceDrawer:
    """Liquid surfaces for the pictures of a run (``outputs.liquid_surface``); never raises.

    :meth:`frame` returns what to draw for one state: the points (liquid particles under the
    surface left out), their colours, and the surface meshes. Any failure (or an empty surface)
    falls back to drawing the particles; the first failure is reported once as a warning and
    counted in :attr:`report` (written to metrics.json).
    """

    def __init__(self, scene: MPMScene, task: MPMTask, colors: np.ndarray) -> None:
        self.scene, self.colors = scene, colors
        ids = scene.model.body.detach().cpu()
        liquid = _liquid_bodies(task) if task.outputs.liquid_surface else []
        self.level = task.outputs.surface_level
        self.mask = torch.zeros_like(ids, dtype=torch.bool)
        for b in liquid:
            self.mask |= ids == b
        lut = torch.full((len(task.bodies) + len(task.emitters),), -1, dtype=torch.int64)
        lut[liquid] = torch.arange(len(liquid))
        self.group = lut[ids[self.mask].long()]  # liquid body number 0..G-1 of each liquid particle
        self.group_colors = BODY_COLORS[np.array(liquid, dtype=np.int64) % len(BODY_COLORS)].reshape(-1, 3)
        self.volume = scene.model.params["volume"].detach().cpu()[self.mask] if liquid else None
        self.report = {"enabled": bool(liquid), "frames": 0, "with_surface": 0, "fallback": 0, "error": None}

    def frame(self, x: torch.Tensor, substep: int):
        """Points, colours and surface meshes of the state after ``substep`` substeps (parked particles
        hidden)."""
        x = x.detach().cpu()
        self.report["frames"] += 1
        active = self.scene.model.released_mask(substep).cpu()
        if not self.report["enabled"]:
            return x[active], self.colors[active.numpy()], []
        liquid = self.mask & active
        try:
            from diffworld.sims.mpm.surface import liquid_surface

            g = self.scene.grid
            sel = active[self.mask]  # released ones among the liquid particles
            surf = liquid_surface(x[liquid], self.volume[sel], self.group[sel], self.group_colors, g.lower, g.dx,
                                  g.shape, level=self.level)
        except Exception as exc:  # noqa: BLE001 - a picture must never stop a run
            if self.report["error"] is None:
                import warnings

                self.report["error"] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"liquid surface failed ({self.report['error']}); drawing the particles instead",
                              RuntimeWarning, stacklevel=2)
            self.report["fallback"] += 1
            return x[active], self.colors[active.numpy()], []
        if surf.faces.shape[0] == 0:
            self.report["fallback"] += 1
            return x[active], self.colors[active.numpy()], []
        self.report["with_surface"] += 1
        keep = active.clone()
        keep[torch.nonzero(liquid).reshape(-1)[torch.from_numpy(surf.covered)]] = False
        return x[keep], self.colors[keep.numpy()], [(surf.vertices, surf.faces, surf.colors)]


def write_patterns(losses: LossTerms, before, after, out_dir: Path) -> list[str]:
    """For each ``pattern`` loss term: ``pattern_<body>.png``, the target next to the body seen from
    above before and after optimization (fraction of the mass per grid column). Returns the names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffworld.sims.mpm.losses import top_view_fraction

    scene, names = losses.scene, []
    g = scene.grid
    extent = (g.lower[0], g.lower[0] + g.dx * (g.shape[0] - 1), g.lower[1], g.lower[1] + g.dx * (g.shape[1] - 1))
    for term, evaluator in zip(losses.terms, losses.prepared):
        if term.type != "pattern":
            continue
        target = evaluator.target
        views = [("target", target.fraction)]
        for label, out in (("before", before), ("after", after)):
            live = losses.masks[term.body] & scene.model.released_mask(out.substeps[-1])
            with torch.no_grad():
                views.append((label, top_view_fraction(out.final.x[live], losses.mass[live], g.lower, g.dx,
                                                         target.fraction.shape)))
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
        vmax = max(float(v.max()) for _, v in views)
        for ax, (label, v) in zip(axes, views):
            ax.imshow(v.detach().cpu().numpy().T, origin="lower", extent=extent, cmap="copper", vmin=0, vmax=vmax)
            ax.set_title(f"{term.body}: {label}")
            ax.set_xlabel("x [m]")
        axes[0].set_ylabel("y [m]")
        fig.suptitle("seen from above: fraction of the mass per grid column")
        fig.tight_layout()
        name = f"pattern_{term.body}.png"
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def write_outputs(scene: MPMScene, before, after, out_dir: Path, task: MPMTask, control, control_before=None) -> dict:
    """Write trajectory.npz, before/after renders and the movie; returns the liquid-surface report.

    ``control`` moved the colliders of ``after`` (and of the movie), ``control_before`` those of
    ``before`` (default: ``control``).
    """
    from diffworld.viz import render_particles
    from diffworld.sims.common.colliders import collider_mesh

    pos = after.positions().detach().cpu().numpy()
    ids = scene.model.body.cpu().numpy()
    col_states = control.detach().cpu().numpy() if control is not None else np.zeros((0, 0, 13))
    # active[k, i]: particle i released by state k (emitters; parked particles' positions mean nothing)
    active = np.stack([scene.model.released_mask(s).cpu().numpy() for s in after.substeps])
    np.savez_compressed(out_dir / "trajectory.npz", positions=pos, body=ids, substeps=np.array(after.substeps),
                        collider_states=col_states, dt=scene.model.dt, bodies=np.array(scene.model.body_names),
                        active=active)
    colors = BODY_COLORS[ids % len(BODY_COLORS)]
    bounds = (scene.grid.lower, scene.grid.upper)
    camera = task.outputs.camera if isinstance(task.outputs.camera, str) else tuple(task.outputs.camera)
    drawer = _SurfaceDrawer(scene, task, colors)

    local = [collider_mesh(c, plane_extent=0.5) for c in scene.model.colliders]  # own frames, built once

    def meshes(step: int, states=control):
        if states is None:
            return []
        t = min(step, states.shape[0] - 1)
        return [collider_mesh(c, states[t, i], local=m) for i, (c, m) in enumerate(zip(scene.model.colliders, local))]

    def draw(states, substeps):
        frames, surfaces = [], []
        for s, k in zip(states, substeps):
            x, c, surf = drawer.frame(s.x, k)
            frames.append((x, c))
            surfaces.append(surf)
        return frames, surfaces

    last = after.substeps[-1]
    for name, rollout, states, title in (("before", before, control if control_before is None else control_before,
                                          "before optimization"), ("after", after, control, "after optimization")):
        frames, surfaces = draw([rollout.final], [rollout.substeps[-1]])
        render_particles(out_dir / f"{name}.png", frames, meshes=[meshes(last, states)], surfaces=surfaces,
                         bounds=bounds, titles=[title], camera=camera)
    if task.outputs.movie != "none":
        idx = np.unique(np.linspace(0, len(after.states) - 1, task.outputs.frames).round().astype(int))
        frames, surfaces = draw([after.states[i] for i in idx], [after.substeps[i] for i in idx])
        render_particles(out_dir / f"rollout.{task.outputs.movie}", frames,
                         meshes=[meshes(after.substeps[i]) for i in idx], surfaces=surfaces, bounds=bounds, fps=10,
                         camera=camera)
    return drawer.report
