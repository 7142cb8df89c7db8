"""Draw docs/images/tactile_optical.png: the dome sensor's optical image at rest and pressed by a
Gaussian dent (0.6 mm deep, 1.5 mm wide). Run from the repository root."""
import torch, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from diffworld.sims.tactile import OpticalImage, SensorCamera, dome
geo = dome(n_points=800)
cam = SensorCamera.difftactile_fisheye()
opt = OpticalImage.at_rest(geo.mesh.vertices, geo.contact_faces, cam)
x = geo.mesh.vertices.clone()
c = torch.tensor([0.3, 0.2, 1.0], dtype=x.dtype); c = c / c.norm() * 15e-3
d = (x - c).norm(dim=1)
x -= (x / x.norm(dim=1, keepdim=True)) * (6e-4 * torch.exp(-d**2 / (2 * 1.5e-3**2)))[:, None] * (x.norm(dim=1, keepdim=True) / 15e-3)
fig, ax = plt.subplots(1, 2, figsize=(8, 3))
for a, y, t in zip(ax, (geo.mesh.vertices, x), ("rest", "pressed")):
    a.imshow(opt.render(y).clamp(0, 1).numpy()); a.set_title(t); a.axis("off")
fig.savefig("docs/images/tactile_optical.png", dpi=80, bbox_inches="tight")
