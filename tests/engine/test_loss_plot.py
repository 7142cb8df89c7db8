"""loss.png: one readable plot per run however many terms and stages it logs (legend outside the
axes, one colour per term in every stage, stages marked, no overflow), built from the run's rows."""

from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

from diffworld.engine.driver import loss_figure, write_loss_plot

# The terms of a FlexiCubes/G-Shell scene, the most a reconstruction logs.
TERMS = ["surface", "normal", "sign", "eikonal", "sdf_sign", "chamfer", "mesh_normal", "dev", "weight_norm",
         "smoothness", "msdf_negative", "msdf_positive"]
STAGES = ["flexicubes16", "flexicubes32", "flexicubes64"]


def many_term_log(iterations: int = 40) -> list[dict]:
    rows = []
    for s, stage in enumerate(STAGES):
        for i in range(iterations):
            t = s * iterations + i
            row = {"stage": stage, "iteration": i, "loss": 5.0 * math.exp(-0.03 * t), "lr": 0.01, "grad_norm": 1.0,
                   "time_s": 0.1 * t}
            for k, term in enumerate(TERMS):
                row[term] = (k + 1) * 0.05 * math.exp(-0.02 * t)
            if s < len(STAGES) - 1:  # the mesh terms only at the finest stage, as the scenes do
                del row["chamfer"], row["mesh_normal"]
            row["dev"] = 0.0 if s == 0 else row["dev"]  # a zero: cannot be drawn on a log axis
            rows.append(row)
    return rows


def drawn(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_many_terms_and_stages_keep_the_legend_off_the_axes_inside_a_sane_figure():
    fig = loss_figure(many_term_log())
    renderer = drawn(fig)
    ax, = fig.axes
    assert len(fig.legends) == 1 and not ax.get_legend()
    legend = fig.legends[0].get_window_extent(renderer)
    axes = ax.get_window_extent(renderer)
    figure = fig.bbox
    assert not legend.overlaps(axes), (legend, axes)
    assert not legend.overlaps(ax.get_tightbbox(renderer)), "the legend covers tick labels"
    for box in (legend, ax.get_tightbbox(renderer)):  # nothing overflows the figure
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= figure.width and box.y1 <= figure.height, box
    width, height = fig.get_size_inches()
    assert 6 <= width <= 12 and 4 <= height <= 8, (width, height)
    assert axes.height > 0.5 * figure.height and axes.width > 0.7 * figure.width, "the axes shrank to a strip"
    assert ax.get_yscale() == "log"


def test_one_colour_and_one_legend_entry_per_term_across_stages():
    fig = loss_figure(many_term_log())
    ax, = fig.axes
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0] == "loss" and sorted(labels[1:]) == sorted(TERMS)  # one entry each, no per-stage copies
    colours = {}
    for line in ax.get_lines():
        if line.get_gid() is not None:
            colours.setdefault(line.get_gid(), set()).add(to_rgba(line.get_color()))
    assert set(colours) == {"loss", *TERMS}
    assert all(len(c) == 1 for c in colours.values()), colours  # the same colour in every stage
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)  # distinct per term
    # Stages are marked by lines between them and named along the top, not by colours.
    boundaries = [line for line in ax.get_lines() if line.get_gid() is None]
    assert len(boundaries) == len(STAGES) - 1
    top, = ax.child_axes  # a secondary x axis
    assert [t.get_text() for t in top.get_xticklabels()] == STAGES


def test_one_stage_few_terms_and_empty_logs_are_well_formed(tmp_path):
    one = [{"stage": "main", "iteration": i, "loss": 1.0 / (i + 1), "first": 0.5 / (i + 1), "lr": 0.1,
            "grad_norm": 1.0, "time_s": 0.0} for i in range(10)]
    for rows in (one, []):
        fig = loss_figure(rows)
        drawn(fig)
        ax = fig.axes[0]
        assert not ax.child_axes  # no stage names for a single stage
        if rows:
            assert [t.get_text() for t in fig.legends[0].get_texts()] == ["loss", "first"]
        else:
            assert not fig.legends and "no iterations logged" in [t.get_text() for t in ax.texts]
    write_loss_plot(one, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
