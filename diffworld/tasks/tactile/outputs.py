"""Files of a ``tactile`` run: force plots, before/after pictures and a GIF of the gel deformation
beside the optical tactile image, and the readings as .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffworld.engine.files import atomic_path
from diffworld.sims.common.quaternion import quat_to_matrix
from diffworld.sims.tactile import OpticalImage, SensorCamera
from diffworld.tasks.tactile.build import Readings
from diffworld.tasks.tactile.config import ForceLossConfig

__all__ = ["sensor_camera", "write_outputs"]


def sensor_camera(scene) -> SensorCamera:
    """The camera inside the sensor: the reference's fisheye at a dome's centre; for a pad, a
    pinhole below its base looking up (+z) with the pad filling about 90 % of a 160 x 160 image."""
    cfg = scene.task.sensor
    if cfg.type == "gripper":
        cfg = cfg.pad
    if cfg.type == "dome":
        return SensorCamera.difftactile_fisheye()
    half = 0.5 * max(cfg.size)
    depth = 2.0 * half  # camera below the base: the pad spans about +-27 degrees
    f = 0.9 * 80.0 * depth / half
    return SensorCamera("pinhole", f, (80.0, 80.0), (160, 160), position=(0.0, 0.0, -depth))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")


def plot_forces(scene, before: Readings, after: Readings | None, path: Path) -> None:
    """Normal and shear force [N] per control step, before and after, with the targets."""
    plt = _plt()
    t = np.arange(before.normal.shape[0]) * scene.step_time * 1e3
    names = getattr(scene, "names", [scene.task.sensor.name])
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for a, key, title in ((ax[0], "normal", "normal force [N]"), (ax[1], "shear", "shear force [N]")):
        for g, name in enumerate(names):
            tag = f" ({name})" if len(names) > 1 else ""
            a.plot(t, getattr(before, key)[:, g].detach().cpu().numpy(), "--", color=f"C{g + 2}",
                   label="before" + tag)
            if after is not None:
                a.plot(t, getattr(after, key)[:, g].detach().cpu().numpy(), color=f"C{g}", label="after" + tag)
        obj = scene.task.objective
        for term in getattr(obj, "losses", []):
            if isinstance(term, ForceLossConfig) and term.component == key:
                a.axhline(term.target, color="C3", lw=0.8, label="target")
        a.set_xlabel("time [ms]")
        a.set_title(title)
        a.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


class _Frames:
    """Draws one frame: a side view (world x-z) of the gel(s) and the object (a rigid object's
    outline in the plane y = the sensor's start y, or the MPM particles), and the first sensor's
    optical image change from rest."""

    def __init__(self, scene) -> None:
        self.scene = scene
        geo = scene.geometry
        rest = geo.mesh.vertices.to(torch.float64)
        try:
            self.optical = OpticalImage.at_rest(rest, geo.contact_faces, sensor_camera(scene), background=(0.1,) * 3)
        except ValueError:  # a camera that cannot see the whole surface: no image
            self.optical = None
        self.rest_image = None if self.optical is None else self.optical.render(rest).clamp(0, 1).numpy()
        models = getattr(scene, "models", [scene.model])
        x0 = torch.cat([m.rest_state().x.detach().to(torch.float64).cpu() for m in models]).numpy()
        if getattr(scene, "mpm_state", None) is not None:
            x0 = np.concatenate([x0, scene.mpm_state.x.detach().to(torch.float64).cpu().numpy()])
        # a rope on a table is seen from above (x-y), everything else from the side (x-z)
        self.axes = (0, 1) if getattr(scene, "rope", None) is not None else (0, 2)
        if self.axes == (0, 1):
            x0 = np.concatenate([x0, scene.rope_start.x.detach().to(torch.float64).cpu().numpy()])
        span = x0.max(0) - x0.min(0)
        pad = 0.15 * float(span.max())
        self.lo, self.hi = x0.min(0) - pad, x0.max(0) + pad
        if getattr(scene, "mpm_state", None) is not None and self.axes == (0, 2):  # room above for a lift
            self.hi[2] += 0.5 * float(span[2])
        self._set_contour()
        self.colliders = self._collider_outlines()

    def _collider_outlines(self) -> list[np.ndarray]:
        """Static MPM colliders (a box's base, a rough strip) as their silhouettes in the view:
        the convex hull of each mesh's projected vertices (exact for the convex kernel shapes)."""
        from scipy.spatial import ConvexHull

        from diffworld.sims.common.colliders import collider_mesh, static

        model = getattr(self.scene, "mpm_model", None)
        if model is None or not model.colliders:
            return []
        i, j = self.axes
        out = []
        for c, cfg in zip(model.colliders, self.scene.task.mpm.colliders):
            v, _ = collider_mesh(c, static(cfg.motion.position, cfg.motion.rotation, 1, torch.float64)[0])
            p = v[:, [i, j]]
            out.append(p[ConvexHull(p).vertices])
        return out

    def _set_contour(self) -> None:
        """The rigid object's section in the view (None for MPM bodies and cables)."""
        scene = self.scene
        self.contour = None
        if getattr(scene, "sdf", None) is not None:
            xs = np.linspace(self.lo[0], self.hi[0], 240)
            zs = np.linspace(self.lo[2], self.hi[2], 200)
            X, Z = np.meshgrid(xs, zs)
            pts = torch.tensor(np.stack([X.ravel(), np.full(X.size, float(scene.start_position[1])), Z.ravel()], 1))
            R = quat_to_matrix(scene.object_rotation.detach().to(torch.float64).cpu())
            local = (pts - scene.object_position.detach().to(torch.float64).cpu()) @ R
            with torch.no_grad():
                phi = scene.sdf(local).reshape(X.shape).numpy()
            self.contour = (X, Z, phi)

    def fit(self, runs) -> None:
        """Widen the view to hold the gels and the object at every record of ``runs``
        ((rollout, velocities) pairs), so that a pushed block or a lifted lid stays in the
        picture and every frame of the GIF shares one view."""
        lo, hi = [], []
        for out, vel in runs:
            for r in range(len(out.steps)):
                xs, _, particles, _, _ = self.scene.frame_data(out, r, vel)
                pts = [x.detach().to(torch.float64).cpu().numpy() for x in xs]
                if particles is not None:
                    pts.append(particles.detach().to(torch.float64).cpu().numpy())
                pts = np.concatenate(pts)
                lo.append(pts.min(0))
                hi.append(pts.max(0))
        if lo:
            margin = 0.05 * float((self.hi - self.lo).max())
            self.lo = np.minimum(self.lo, np.min(lo, 0) - margin)
            self.hi = np.maximum(self.hi, np.max(hi, 0) + margin)
            self._set_contour()

    def draw(self, out, r: int, velocities, label: str) -> np.ndarray:
        plt = _plt()
        scene = self.scene
        xs, contact, particles, local, step = scene.frame_data(out, r, velocities)
        fig, ax = plt.subplots(1, 2 if self.optical is not None else 1, figsize=(8, 3.4), squeeze=False)
        a = ax[0, 0]
        if self.contour is not None:
            X, Z, phi = self.contour
            a.contourf(X * 1e3, Z * 1e3, phi, levels=[-1.0, 0.0], colors=["0.75"])
        i, j = self.axes
        for poly in self.colliders:
            a.fill(poly[:, 0] * 1e3, poly[:, 1] * 1e3, color="0.8", zorder=0)
        if particles is not None:
            p = particles.to(torch.float64).cpu().numpy()
            if self.axes == (0, 1):  # the rope
                a.plot(p[:, i] * 1e3, p[:, j] * 1e3, "-o", color="C1", ms=3)
            else:
                body = getattr(scene, "mpm_model", None)
                body = None if body is None else body.body.cpu().numpy()
                if body is not None and len(body) == len(p):  # one colour per body (a hinge and its lid)
                    a.scatter(p[:, i] * 1e3, p[:, j] * 1e3, s=1, c=[f"C{1 + k % 9}" for k in body])
                else:
                    a.scatter(p[:, i] * 1e3, p[:, j] * 1e3, s=1, color="C1")
        for x, nodes in zip(xs, contact):
            xn = x.to(torch.float64).cpu().numpy()
            a.scatter(xn[:, i] * 1e3, xn[:, j] * 1e3, s=2, color="0.55")
            c = xn[nodes.cpu().numpy()]
            a.scatter(c[:, i] * 1e3, c[:, j] * 1e3, s=4, color="C0")
        a.set_xlim(self.lo[i] * 1e3, self.hi[i] * 1e3)
        a.set_ylim(self.lo[j] * 1e3, self.hi[j] * 1e3)
        a.set_aspect("equal")
        a.set_xlabel("x [mm]")
        a.set_ylabel("y [mm] (from above)" if j == 1 else "z [mm]")
        a.set_title(f"{label}: t = {step * scene.dt * 1e3:.1f} ms")
        if self.optical is not None:
            with torch.no_grad():
                img = self.optical.render(local.to(torch.float64).cpu()).clamp(0, 1).numpy()
            # the change from the image at rest, amplified: the contact print
            ax[0, 1].imshow(np.clip(0.5 + 4.0 * (img - self.rest_image), 0, 1))
            ax[0, 1].set_axis_off()
            ax[0, 1].set_title("tactile image - rest (x4)")
        fig.tight_layout()
        fig.canvas.draw()
        frame = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
        plt.close(fig)
        return frame


def write_outputs(scene, before, after, out_dir: Path, velocities_before=None,
                  velocities_after=None) -> dict:
    """Write forces.png, before.png, after.png, rollout.gif and readings.npz; return file names."""
    import imageio.v3 as iio

    (out_b, r_b), (out_a, r_a) = before, after
    files = {}
    plot_forces(scene, r_b, r_a, out_dir / "forces.png")
    files["forces"] = "forces.png"
    frames = _Frames(scene)
    frames.fit([(out_b, velocities_before), (out_a, velocities_after)])
    for name, out, vel in (("before", out_b, velocities_before), ("after", out_a, velocities_after)):
        with atomic_path(out_dir / f"{name}.png") as tmp:
            iio.imwrite(tmp, frames.draw(out, len(out.steps) - 1, vel, name))
        files[name] = f"{name}.png"
    n = scene.task.outputs.frames
    if n:
        pick = np.unique(np.linspace(0, len(out_a.steps) - 1, min(n, len(out_a.steps))).round().astype(int))
        imgs = [frames.draw(out_a, int(i), velocities_after, "after") for i in pick]
        with atomic_path(out_dir / "rollout.gif") as tmp:
            iio.imwrite(tmp, np.stack(imgs), duration=100, loop=0)
        files["gif"] = "rollout.gif"
    with atomic_path(out_dir / "readings.npz") as tmp:
        np.savez(tmp, **{f"{k}_{name}": getattr(r, k).detach().cpu().numpy()
                         for name, r in (("before", r_b), ("after", r_a))
                         for k in ("force", "normal", "shear", "penetration")})
    files["readings"] = "readings.npz"
    return files
