"""Benchmark: the cost of G-Shell's cut, and its accuracy, on the FlexiCubes and marching-tets templates.

Field: signed distance of a sphere r=0.4 on the (n+1)^3 node grid of [-0.5, 0.5]^3 (float32),
cut by the manifold SDF ``msdf = 0.1 - z``: the open surface is the sphere below z = 0.1, whose
boundary is a circle of length 2 pi sqrt(0.4^2 - 0.1^2) = 2.4335. Both fields are leaves with
``requires_grad=True``.

For each resolution and template, two implementations:

* template alone (the baseline): ``flexicubes(sdf, bounds, training=)`` (no weights: the plain
  dual mesh; eval and training mode) or ``marching_tets(sdf, bounds)``;
* G-Shell: ``gshell_flexicubes(sdf, msdf, bounds, training=)`` or
  ``gshell_marching_tets(sdf, msdf, bounds)`` (the template carrying msdf, then the cut).

Measured as in ``benchmarks/flexicubes.py`` (its helpers are reused), after an 8^3 warm-up in
every child: peak memory of each implementation in its own fresh child process (growth of the
resident-set high-water mark over the RSS right before the first full-size forward+backward:
``/proc/self/clear_refs`` reset, freed heap trimmed first; on CUDA the torch allocator's peak
as well); forward and forward+backward times in one more child that runs the two in
alternation, the best of up to ``--repeat`` rounds (medians in the ``--json`` output); on CPU
the clock is the process's CPU time (single-threaded work; not inflated by other processes). Loss
``vertices.square().sum()`` of the output mesh (for G-Shell its gradient reaches msdf through
the cut vertices). Ratios G-Shell / template are the cost of the cut.

Accuracy of the open surface: vertex and face counts, boundary edges, boundary length and its
error against 2.4335 (the discretization error of the template shows here too), and the Euler
characteristic V - E + F (1 for a disc).

Usage::

    python benchmarks/gshell.py [--quick] [--sizes 64 128 256] [--device cpu|cuda] [--repeat 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def _load_flexicubes_bench():
    """benchmarks/flexicubes.py, loaded by path (it shares its name with the diffworld module)."""
    spec = importlib.util.spec_from_file_location("bench_flexicubes", HERE / "flexicubes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fcb = _load_flexicubes_bench()

CUT_HEIGHT = 0.1
BOUNDARY_LENGTH = 2 * math.pi * math.sqrt(fcb.RADIUS**2 - CUT_HEIGHT**2)  # 2.4335
TEMPLATES = ("flexicubes-eval", "flexicubes-train", "marching-tets")
IMPL_NAMES = {False: "template", True: "gshell"}  # keyed by ``cut``


# --- child --------------------------------------------------------------------------------------

def cut_field(n: int, device):
    """msdf = 0.1 - z on the (n+1)^3 node grid of [-0.5, 0.5]^3, float32."""
    import torch

    z = torch.linspace(-0.5, 0.5, n + 1, dtype=torch.float64)
    return (CUT_HEIGHT - z).to(torch.float32).expand(n + 1, n + 1, n + 1).contiguous().to(device)


def setup(template: str, cut: bool, n: int, device):
    """(forward, leaves): forward returns (vertices, faces, boundary edges or None)."""
    from diffworld.geometry.flexicubes import flexicubes
    from diffworld.geometry.gshell import gshell_flexicubes, gshell_marching_tets
    from diffworld.geometry.marching_tets import marching_tets

    sdf = fcb.sphere_sdf(n, device).requires_grad_()
    msdf = cut_field(n, device).requires_grad_()
    training = template == "flexicubes-train"

    def forward():
        if template == "marching-tets":
            m = gshell_marching_tets(sdf, msdf, fcb.BOUNDS) if cut else marching_tets(sdf, fcb.BOUNDS)
        else:
            m = (gshell_flexicubes(sdf, msdf, fcb.BOUNDS, training=training) if cut
                 else flexicubes(sdf, fcb.BOUNDS, training=training))
        return m.vertices, m.faces, (m.boundary_edges if cut else None)

    return forward, [sdf, msdf]


def loss_of(out):
    return out[0].square().sum()


def open_surface_stats(vertices, faces, boundary) -> dict:
    """Counts, boundary length and Euler characteristic V - E + F of the open surface."""
    import torch

    v = vertices.detach().double()
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
    n_edges = int(torch.unique(edges, dim=0).shape[0]) if edges.numel() else 0
    length = float((v[boundary[:, 0]] - v[boundary[:, 1]]).norm(dim=1).sum())
    return dict(vertices=int(v.shape[0]), faces=int(faces.shape[0]), boundary_edges=int(boundary.shape[0]),
                boundary_length=length, euler=int(v.shape[0]) - n_edges + int(faces.shape[0]))


def worker(job: dict) -> dict:
    """``task == "memory"``: peak memory and open-surface stats of one implementation (``cut``);
    ``"timing"``: times of the template and the cut, run in alternation."""
    import torch

    from diffworld.engine.runtime import init_warp

    torch.set_num_threads(1)
    init_warp()
    device = torch.device(job["device"])
    cuts = [job["cut"]] if job["task"] == "memory" else [False, True]
    # Warm-up on a tiny grid (the sphere fits an 8^3 grid): imports, kernels, dispatch caches.
    for cut in cuts:
        forward, _ = setup(job["template"], cut, 8, device)
        loss_of(forward()).backward()
    if job["task"] == "timing":
        cases = {IMPL_NAMES[cut]: setup(job["template"], cut, job["size"], device) for cut in cuts}
        return fcb.measure_times({k: (f, loss_of, leaves) for k, (f, leaves) in cases.items()}, device,
                                 job["repeat"], job["budget"])
    forward, _ = setup(job["template"], job["cut"], job["size"], device)
    result = fcb.measure_memory(forward, loss_of, device)
    vertices, faces, boundary = result.pop("output")
    if boundary is not None:
        result.update(open_surface_stats(vertices, faces, boundary))
    else:
        result.update(vertices=int(vertices.shape[0]), faces=int(faces.shape[0]))
    return result


# --- parent -------------------------------------------------------------------------------------

def print_table(rows: list[dict], args) -> None:
    fmt, mib = fcb.fmt, fcb.MIB
    title = (f"G-Shell, sphere r=0.4 cut by msdf = 0.1 - z, float32, {args.device}: "
             "cost of the cut over the template alone")
    print(title)
    print("=" * len(title))
    for line in fcb.machine_lines(args.device):
        print(line)
    print(f"timing  : best of up to {args.repeat} forward+backward rounds, template and cut alternating in one process "
          f"(no new round after {args.budget:.0f} s); loss = vertices.square().sum()")
    print("clock   : " + fcb.CLOCK_NOTE[args.device == "cpu"])
    print("memory  : peak RSS growth of the first forward+backward in a fresh process [MiB], inputs excluded")
    print(f"accuracy: boundary length vs 2 pi sqrt(0.4^2 - 0.1^2) = {BOUNDARY_LENGTH:.4f}; Euler characteristic "
          "of a disc = 1")
    print()
    gpu = args.device.startswith("cuda")
    head = (f"{'res':>5} {'template':<16} | {'tmpl fwd s':>10} {'fwd+bwd s':>10} {'peak MB':>8} | "
            f"{'cut fwd s':>10} {'fwd+bwd s':>10} {'peak MB':>8} | {'x fwd':>6} {'x f+b':>6} {'x mem':>6} | "
            f"{'V':>7} {'F':>7} {'B':>5} {'length':>7} {'err %':>7} {'chi':>4}")
    if gpu:
        head += f" | {'GPU tmpl':>8} {'GPU cut':>8}"
    print(head)
    print("-" * len(head))
    notes = []
    for r in rows:
        t, c = r["template"], r["gshell"]
        line = f"{str(r['size']) + '^3':>5} {r['name']:<16} | "
        for res, who in ((t, "template"), (c, "gshell")):
            line += fcb.timing_cells(res)
            if "error" in res:
                notes.append(f"{r['size']}^3 {r['name']} {who}: {res['error']}")
        ok = "error" not in t and "error" not in c
        ratios = (c["fwd_s"] / t["fwd_s"], c["fwdbwd_s"] / t["fwdbwd_s"],
                  c["peak_bytes"] / t["peak_bytes"] if t["peak_bytes"] > 0 else None) if ok else (None,) * 3
        line += " ".join(fmt(x, ".2f", 6) for x in ratios) + " | "
        err = 100 * (c["boundary_length"] / BOUNDARY_LENGTH - 1) if "boundary_length" in c else None
        line += " ".join([fmt(c.get("vertices"), "d", 7), fmt(c.get("faces"), "d", 7),
                          fmt(c.get("boundary_edges"), "d", 5), fmt(c.get("boundary_length"), ".4f", 7),
                          fmt(err, "+.3f", 7), fmt(c.get("euler"), "d", 4)])
        if gpu:
            line += " | " + " ".join(fmt((res.get("gpu_peak_bytes") or float("nan")) / mib, ".0f", 8) for res in (t, c))
        print(line)
    print()
    print("tmpl = the watertight template alone (flexicubes without weights / marching_tets); cut = gshell_*; "
          "x = cut / tmpl (fwd, fwd+bwd, peak memory);")
    print("V, F, B = vertices, faces and boundary edges of the open surface; err % = boundary length error; "
          "chi = V - E + F.")
    for note in notes:
        print("note: " + note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    fcb.add_child_arguments(parser, budget=30.0, timeout=600.0)
    parser.add_argument("--templates", nargs="+", default=list(TEMPLATES), choices=TEMPLATES)
    args = parser.parse_args(argv)
    if args.worker:
        print(fcb.RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    sizes = fcb.checked_sizes(parser, args, 8, " (the sphere must fit inside the grid)")

    script = pathlib.Path(__file__).resolve()
    rows = []
    for n in sizes:
        for name in args.templates:
            job = dict(size=n, template=name, device=args.device, repeat=args.repeat, budget=args.budget)
            run = lambda extra: fcb.run_child(script, dict(job, **extra), args.timeout,  # noqa: E731
                                              args.max_rss_gb * 2**30)
            memory = {cut: run(dict(task="memory", cut=cut)) for cut in (False, True)}
            times = run(dict(task="timing"))
            rows.append(dict(size=n, name=name, **{IMPL_NAMES[c]: fcb.merge_results(memory[c], times, IMPL_NAMES[c])
                                                   for c in (False, True)}))
            print(f"  measured {n}^3 {name}", file=sys.stderr, flush=True)
    print_table(rows, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=args.device, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
