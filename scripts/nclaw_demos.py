"""NCLaw's multi-physics demos with learned laws, each scored against the truth doing the same:

1. **jelly in water**: a cube governed by a learned jelly law falls, spinning, into a pool of
   (built-in) water on one grid; the truth is the same scene with the built-in jelly.
2. **plasticine to sand**: NCLaw's thrown cube under a learned plasticine law for the first half,
   then a learned sand law from the same state on; the truth switches the built-in laws at the
   same step (both at density 1000 kg/m^3, so that only the law changes).

Each demo also runs the untrained law (a stress-free start) as the "no law" reference. Scores are
NCLaw's metric: the position MSE [m^2] at every 5th frame, averaged (for the jelly demo, of the
jelly's particles and of the water's separately). Writes ``demos.json`` and ``demos.png`` (the
last frame of each, truth vs learned, projected on x-z).

Usage::

    python scripts/nclaw_demos.py --jelly RUN/law.pt --plasticine RUN/law.pt --sand RUN/law.pt --out DIR

Runtime on a 2-core CPU: about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffworld.engine.runtime import init_warp
from diffworld.geometry.sdf import Box
from diffworld.sims import mpm
from diffworld.sims.constitutive.neural import load_law

DT = 5e-4
EVERY = 5


def _untrained_like(law):
    """The law's architecture with every weight zero: no stress, no plastic flow ("no law")."""
    import copy

    fresh = copy.deepcopy(law).requires_grad_(False)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    return fresh


def _run(model, state, steps):
    with torch.no_grad():
        return mpm.rollout(model, state, steps, None, window=200, record_every=EVERY).states


def _mse(a, b, idx):
    return float(np.mean([float(((x.x[idx] - y.x[idx]) ** 2).mean()) for x, y in zip(a[1:], b[1:])]))


def jelly_in_water(law_path: str, steps: int) -> dict:
    """A learned jelly cube (0.2 m, spinning) dropped into a 0.2 m deep pool."""
    grid = mpm.GridSpec.make((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 24)
    lo, hi = grid.inner_box()
    depth = 0.2
    pool = Box(((hi[0] - lo[0]) / 2, (hi[1] - lo[1]) / 2, depth / 2), (0.5, 0.5, lo[2] + depth / 2))

    def build(jelly_material):
        bodies = [mpm.Body(pool, mpm.material("water"), name="water", ppc=8),
                  mpm.Body(Box((0.1, 0.1, 0.1), (0.45, 0.5, 0.58)), jelly_material, (0.5, 0.0, -2.0), "jelly", ppc=8)]
        model, state = mpm.build_model(grid, bodies, dt=DT, gravity=(0, 0, -9.8), wall="slip", dtype=torch.float32)
        j = model.body == 1
        c = state.x[j].mean(0)
        spin = torch.linalg.cross(torch.tensor([3.0, 3.0, 3.0]).expand_as(state.x), state.x - c)
        return model, mpm.State(state.x, torch.where(j[:, None], state.v + spin, state.v), state.C, state.F)

    truth_model, state = build(mpm.material("jelly"))
    law = load_law(law_path)
    base, _ = build(mpm.material("jelly"))
    jelly, water = truth_model.body == 1, truth_model.body == 0
    t = time.perf_counter()
    truth = _run(truth_model, state, steps)
    learned = _run(mpm.use_law(base, law, "jelly"), state, steps)
    none = _run(mpm.use_law(base, _untrained_like(law), "jelly"), state, steps)
    return {"particles": truth_model.n_particles, "jelly_particles": int(jelly.sum()), "steps": steps,
            "jelly_mse_learned": _mse(learned, truth, jelly), "jelly_mse_untrained": _mse(none, truth, jelly),
            "water_mse_learned": _mse(learned, truth, water), "water_mse_untrained": _mse(none, truth, water),
            "seconds": time.perf_counter() - t,
            "_frames": {"truth": truth[-1].x.numpy(), "learned": learned[-1].x.numpy(), "jelly": jelly.numpy()}}


def plasticine_to_sand(plasticine_path: str, sand_path: str, steps: int) -> dict:
    """NCLaw's thrown cube: plasticine for ``steps // 2`` steps, then sand."""
    grid = mpm.GridSpec.make((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 20)

    def build(material):
        body = mpm.Body(Box((0.25, 0.25, 0.25), (0.5, 0.5, 0.5)), material, (1.0, -1.5, -2.0), "cube", ppc=1)
        model, state = mpm.build_model(grid, [body], dt=DT, gravity=(0, 0, -9.8), wall="slip", dtype=torch.float32)
        x = state.x
        v = state.v + torch.linalg.cross(torch.tensor([4.0, 4.0, 4.0]).expand_as(x), x - x.mean(0))
        return model, mpm.State(x, v, state.C, state.F)

    plasticine, state = build(mpm.material("plasticine"))
    sand, _ = build(mpm.material("sand", density=1000.0))
    half = steps // 2
    laws = {"truth": (plasticine, sand)}
    lp, ls = load_law(plasticine_path), load_law(sand_path)
    laws["learned"] = (mpm.use_law(plasticine, lp, "cube"), mpm.use_law(sand, ls, "cube"))
    laws["untrained"] = (mpm.use_law(plasticine, _untrained_like(lp), "cube"),
                         mpm.use_law(sand, _untrained_like(ls), "cube"))
    t = time.perf_counter()
    runs = {}
    for name, (m1, m2) in laws.items():
        first = _run(m1, state, half)
        runs[name] = first + _run(m2, first[-1], steps - half)[1:]
    out = {"particles": plasticine.n_particles, "steps": steps, "switch_step": half,
           "mse_learned": _mse(runs["learned"], runs["truth"], slice(None)),
           "mse_untrained": _mse(runs["untrained"], runs["truth"], slice(None)),
           "seconds": time.perf_counter() - t,
           "_frames": {"truth": runs["truth"][-1].x.numpy(), "learned": runs["learned"][-1].x.numpy()}}
    return out


def _picture(path: Path, demos: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), constrained_layout=True)
    jw = demos["jelly_in_water"]["_frames"]
    ax = axes[0]
    for name, colour in (("truth", "0.65"), ("learned", "C0")):
        x = jw[name]
        ax.scatter(x[~jw["jelly"], 0], x[~jw["jelly"], 2], s=1, color="C9" if name == "learned" else "0.85")
        ax.scatter(x[jw["jelly"], 0], x[jw["jelly"], 2], s=3, color=colour, label=f"jelly ({name})")
    ax.set_title("learned jelly in water (last frame)", fontsize=9)
    ps = demos["plasticine_to_sand"]["_frames"]
    for name, colour in (("truth", "0.65"), ("learned", "C1")):
        axes[1].scatter(ps[name][:, 0], ps[name][:, 2], s=3, color=colour, label=name)
    axes[1].set_title("learned plasticine -> sand (last frame)", fontsize=9)
    for a in axes:
        a.set_xlim(0, 1)
        a.set_ylim(0, 1)
        a.set_aspect("equal")
        a.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jelly", required=True, help="learned jelly law (.pt)")
    ap.add_argument("--plasticine", required=True, help="learned plasticine law (.pt)")
    ap.add_argument("--sand", required=True, help="learned sand law (.pt)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="runs/nclaw_demos")
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_warp()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demos = {"jelly_in_water": jelly_in_water(args.jelly, args.steps),
             "plasticine_to_sand": plasticine_to_sand(args.plasticine, args.sand, args.steps)}
    _picture(out / "demos.png", demos)
    report = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in demos.items()}
    (out / "demos.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
