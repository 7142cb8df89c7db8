"""Draw docs/images/tactile_surface_following.png from a run of scenes/tactile_surface_following.yaml:
the normal force before/after beside a frame of the optimized slide. Run from the repository root:

    diffworld optimize scenes/tactile_surface_following.yaml --out runs/tsf
    python scripts/tactile_surface_following_picture.py runs/tsf
"""
import sys

import imageio.v3 as iio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

run = sys.argv[1] if len(sys.argv) > 1 else "runs/tsf"
forces = iio.imread(f"{run}/forces.png")
frames = iio.imread(f"{run}/rollout.gif", index=None)
fig, ax = plt.subplots(2, 1, figsize=(8, 6.2), gridspec_kw={"height_ratios": [forces.shape[0], frames.shape[1]]})
ax[0].imshow(forces[:, : forces.shape[1] // 2 - 8])
ax[1].imshow(frames[len(frames) * 2 // 3])
for a in ax:
    a.axis("off")
fig.tight_layout()
fig.savefig("docs/images/tactile_surface_following.png", dpi=90, bbox_inches="tight")
