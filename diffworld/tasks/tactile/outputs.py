"""Files of a ``tactile`` run: force plots, before/after pictures and a GIF of the gel deformation
beside the optical tactile image, and the readings as .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffworld.engine.files import atomic_path
from diffworld.sims.common.quaternion import quat_to_matrix
from diffworld.sims.tactile import OpticalImage, SensorCamera
from diffworld.tasks.tactile.build import Readings, TactileScene
from diffworld.tasks.tactile.config import ForceLossConfig

__all__ = ["sensor_camera", "write_outputs"]


def sensor_camera(scene: TactileScene) -> SensorCamera:
    """The camera inside the sensor: the reference's fisheye at a dome's centre; for a pad, a
    pinhole below its base looking up (+z) with the pad filling about 90 % of a 160 x 160 image."""
    cfg = scene.task.sensor
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


def plot_forces(scene: TactileScene, before: Readings, after: Readings | None, path: Path) -> None:
    """Normal and shear force [N] per control step, before and after, with the targets."""
    plt = _plt()
    t = np.arange(before.normal.shape[0]) * scene.step_time * 1e3
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for a, key, title in ((ax[0], "normal", "normal force [N]"), (ax[1], "shear", "shear force [N]")):
        a.plot(t, getattr(before, key).detach().cpu().numpy(), "--", color="0.5", label="before")
        if after is not None:
            a.plot(t, getattr(after, key).detach().cpu().numpy(), color="C0", label="after")
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
    """Draws one frame: a side view (world x-z) of the gel and the object, and the optical image."""

    def __init__(self, scene: TactileScene) -> None:
        self.scene = scene
        geo = scene.geometry
        rest = geo.mesh.vertices.to(torch.float64)
        try:
            self.optical = OpticalImage.at_rest(rest, geo.contact_faces, sensor_camera(scene), background=(0.1,) * 3)
        except ValueError:  # a camera that cannot see the whole surface: no image
            self.optical = None
        x0 = scene.model.rest_state().x.detach().to(torch.float64).cpu().numpy()
        span = x0.max(0) - x0.min(0)
        pad = 0.15 * float(span.max())
        self.lo, self.hi = x0.min(0) - pad, x0.max(0) + pad
        # the object's zero contour in the plane y = the sensor's start y
        xs = np.linspace(self.lo[0], self.hi[0], 240)
        zs = np.linspace(self.lo[2], self.hi[2], 200)
        X, Z = np.meshgrid(xs, zs)
        pts = torch.tensor(np.stack([X.ravel(), np.full(X.size, float(scene.start_position[1])), Z.ravel()], 1))
        R = quat_to_matrix(scene.object_rotation.detach().to(torch.float64).cpu())
        local = (pts - scene.object_position.detach().to(torch.float64).cpu()) @ R
        with torch.no_grad():
            phi = scene.sdf(local).reshape(X.shape).numpy()
        self.contour = (X, Z, phi)
        self.surface = geo.contact_nodes.numpy()
        self.rest_image = None if self.optical is None else self.optical.render(rest).clamp(0, 1).numpy()

    def draw(self, x: torch.Tensor, step: int, velocities, label: str) -> np.ndarray:
        plt = _plt()
        scene = self.scene
        fig, ax = plt.subplots(1, 2 if self.optical is not None else 1, figsize=(8, 3.4), squeeze=False)
        a = ax[0, 0]
        X, Z, phi = self.contour
        a.contourf(X * 1e3, Z * 1e3, phi, levels=[-1.0, 0.0], colors=["0.75"])
        xn = x.detach().to(torch.float64).cpu().numpy()
        a.scatter(xn[:, 0] * 1e3, xn[:, 2] * 1e3, s=2, color="0.55")
        c = xn[self.surface]
        a.scatter(c[:, 0] * 1e3, c[:, 2] * 1e3, s=4, color="C0")
        a.set_xlim(X.min() * 1e3, X.max() * 1e3)
        a.set_ylim(Z.min() * 1e3, Z.max() * 1e3)
        a.set_aspect("equal")
        a.set_xlabel("x [mm]")
        a.set_ylabel("z [mm]")
        a.set_title(f"{label}: t = {step * scene.dt * 1e3:.1f} ms")
        if self.optical is not None:
            local = scene.sensor_frame_nodes(x.detach(), step, velocities).to(torch.float64).cpu()
            with torch.no_grad():
                img = self.optical.render(local).clamp(0, 1).numpy()
            # the change from the image at rest, amplified: the contact print
            ax[0, 1].imshow(np.clip(0.5 + 4.0 * (img - self.rest_image), 0, 1))
            ax[0, 1].set_axis_off()
            ax[0, 1].set_title("tactile image - rest (x4)")
        fig.tight_layout()
        fig.canvas.draw()
        frame = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
        plt.close(fig)
        return frame


def write_outputs(scene: TactileScene, before, after, out_dir: Path, velocities_before=None,
                  velocities_after=None) -> dict:
    """Write forces.png, before.png, after.png, rollout.gif and readings.npz; return file names."""
    import imageio.v3 as iio

    (out_b, r_b), (out_a, r_a) = before, after
    files = {}
    plot_forces(scene, r_b, r_a, out_dir / "forces.png")
    files["forces"] = "forces.png"
    frames = _Frames(scene)
    for name, out, vel in (("before", out_b, velocities_before), ("after", out_a, velocities_after)):
        with atomic_path(out_dir / f"{name}.png") as tmp:
            iio.imwrite(tmp, frames.draw(out.final.x, out.steps[-1], vel, name))
        files[name] = f"{name}.png"
    n = scene.task.outputs.frames
    if n:
        pick = np.unique(np.linspace(0, len(out_a.states) - 1, min(n, len(out_a.states))).round().astype(int))
        imgs = [frames.draw(out_a.states[i].x, out_a.steps[i], velocities_after, "after") for i in pick]
        with atomic_path(out_dir / "rollout.gif") as tmp:
            iio.imwrite(tmp, np.stack(imgs), duration=100, loop=0)
        files["gif"] = "rollout.gif"
    with atomic_path(out_dir / "readings.npz") as tmp:
        np.savez(tmp, **{f"{k}_{name}": getattr(r, k).detach().cpu().numpy()
                         for name, r in (("before", r_b), ("after", r_a))
                         for k in ("force", "normal", "shear", "penetration")})
    files["readings"] = "readings.npz"
    return files
