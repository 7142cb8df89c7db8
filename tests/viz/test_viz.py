"""Off-screen rendering: sizes, non-blank images, shared framing, backend agreement, fallback, errors."""

import importlib.util
import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from diffworld import viz as render
from diffworld.viz import (
    render_backend,
    render_mesh,
    render_particles,
    render_points,
    render_side_by_side,
    render_turntable,
)

SMALL = (160, 120)


def torus(R=0.3, r=0.1, n_u=40, n_v=20, stretch=1.0):
    """Closed parametric torus (V, 3) float64, (F, 3) int64; ``stretch`` scales x (breaks symmetry)."""
    u = np.linspace(0, 2 * np.pi, n_u, endpoint=False)
    v = np.linspace(0, 2 * np.pi, n_v, endpoint=False)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    x = np.stack([(R + r * np.cos(vv)) * np.cos(uu) * stretch, (R + r * np.cos(vv)) * np.sin(uu), r * np.sin(vv)], -1)
    i, j = np.meshgrid(np.arange(n_u), np.arange(n_v), indexing="ij")
    a, b = i * n_v + j, ((i + 1) % n_u) * n_v + j
    c, d = ((i + 1) % n_u) * n_v + (j + 1) % n_v, i * n_v + (j + 1) % n_v
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return x.reshape(-1, 3), faces.astype(np.int64)


def sphere_points(n=400, radius=0.35, seed=0):
    p = np.random.default_rng(seed).normal(size=(n, 3))
    return radius * p / np.linalg.norm(p, axis=1, keepdims=True)


def read(path):
    img = iio.imread(path)
    return img[..., :3] if img.ndim == 3 else img[..., :3]


def assert_not_blank(img, min_std=10.0, min_fraction=0.02):
    assert float(img.std()) > min_std
    drawn = (np.abs(img.astype(int) - 255).sum(-1) > 30).mean()
    assert drawn > min_fraction, f"only {drawn:.3%} of the pixels differ from the white background"


@pytest.fixture(params=["matplotlib", "pyvista"])
def backend(request):
    if request.param == "pyvista" and render_backend("auto") != "pyvista":
        pytest.skip("pyvista off-screen rendering is not available here (matplotlib fallback in use)")
    return request.param


# --- every function writes a non-blank image of the requested size ---------------------------------

def test_render_mesh_default_size_with_mesh_target(tmp_path, backend):
    v, f = torus()
    target = (torch.from_numpy(sphere_points()), torch.tensor([[0, 1, 2], [1, 2, 3]]))  # tiny target mesh
    out = render_mesh(tmp_path / "m.png", torch.from_numpy(v).float().requires_grad_(), torch.from_numpy(f),
                      target=target, title="mesh", backend=backend)
    assert out == tmp_path / "m.png" and out.stat().st_size > 0
    img = read(out)
    assert img.shape == (600, 800, 3)
    assert_not_blank(img)


def test_render_mesh_point_target_and_camera_tuple(tmp_path, backend):
    v, f = torus()
    out = render_mesh(tmp_path / "sub" / "m.png", v, f, target=sphere_points(), camera=(30.0, 60.0),
                      window_size=(240, 180), color="tab:green", backend=backend)
    img = read(out)
    assert img.shape == (180, 240, 3)
    assert_not_blank(img)
    # The overlay is drawn in its own (orange) color somewhere.
    orange = (img[..., 0].astype(int) - img[..., 2].astype(int)) > 40
    assert orange.sum() > 10


def test_render_side_by_side_both_panels_drawn(tmp_path, backend):
    v, f = torus()
    out = render_side_by_side(tmp_path / "s.png", (v, f), sphere_points(), window_size=(320, 160), backend=backend)
    img = read(out)
    assert img.shape == (160, 320, 3)
    assert_not_blank(img[:, :160])
    assert_not_blank(img[:, 160:], min_fraction=0.005)


def test_render_points_scalars_and_rgb(tmp_path, backend):
    p = sphere_points()
    out = render_points(tmp_path / "p.png", torch.from_numpy(p), torch.from_numpy(p[:, 2]), point_size=6,
                        window_size=SMALL, backend=backend)
    img = read(out)
    assert img.shape == (SMALL[1], SMALL[0], 3)
    assert_not_blank(img, min_fraction=0.01)
    rgb = np.clip(p + 0.5, 0, 1)
    assert_not_blank(read(render_points(tmp_path / "q.png", p, rgb, window_size=SMALL, backend=backend)),
                     min_fraction=0.01)
    assert_not_blank(read(render_points(tmp_path / "r.png", p, (rgb * 255).astype(np.uint8), window_size=SMALL,
                                        backend=backend)), min_fraction=0.01)


def test_render_particles_with_colored_surfaces(tmp_path, backend):
    """Surfaces (liquids) are drawn in their own colors: one per mesh or one per vertex."""
    v, f = torus()
    rgb = np.where(v[:, :1] < 0, [[0.9, 0.1, 0.1]], [[0.1, 0.8, 0.1]])  # red half, green half
    pts = sphere_points(50, radius=0.5)
    out = render_particles(tmp_path / "s.png", [(pts, None)], surfaces=[[(v, f, rgb)]], surface_opacity=1.0,
                           window_size=SMALL, camera="top", backend=backend)
    img = read(out).astype(int)
    assert_not_blank(img)
    red = (img[..., 0] - img[..., 1] > 60) & (img[..., 0] - img[..., 2] > 60)
    green = (img[..., 1] - img[..., 0] > 60) & (img[..., 1] - img[..., 2] > 60)
    assert red.sum() > 50 and green.sum() > 50
    # one color for the whole mesh, an empty surface, and a movie of two frames
    out = render_particles(tmp_path / "m.gif", [(pts, None), (pts, None)],
                           surfaces=[[(v, f, (0.1, 0.2, 0.9))], [(np.zeros((0, 3)), np.zeros((0, 3), np.int64),
                                                                  np.zeros((0, 3)))]],
                           window_size=SMALL, backend=backend)
    frames = iio.imread(out)
    assert frames.shape[:3] == (2, SMALL[1], SMALL[0])
    blue = (frames[0][..., 2].astype(int) - frames[0][..., 0].astype(int)) > 60
    assert blue.sum() > 50


def test_render_turntable_gif_frames_rotate(tmp_path, backend):
    v, f = torus(stretch=1.6)
    out = render_turntable(tmp_path / "t.gif", v, f, n_frames=4, fps=8, window_size=SMALL, backend=backend)
    frames = iio.imread(out)
    assert frames.shape[:3] == (4, SMALL[1], SMALL[0])
    for frame in frames:
        assert_not_blank(frame[..., :3])
    # A 90 degree turn of an elongated torus changes the picture; 4 frames cover 360 degrees.
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).mean() > 2.0


def test_render_turntable_mp4_or_gif_fallback(tmp_path):
    v, f = torus(stretch=1.6)  # asymmetric: the GIF encoder merges identical consecutive frames
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        with pytest.warns(RuntimeWarning, match="imageio-ffmpeg"):
            out = render_turntable(tmp_path / "t.mp4", v, f, n_frames=3, window_size=SMALL, backend="matplotlib")
        assert out == tmp_path / "t.gif"
        assert iio.imread(out).shape[:3] == (3, SMALL[1], SMALL[0])
    else:
        out = render_turntable(tmp_path / "t.mp4", v, f, n_frames=3, window_size=SMALL, backend="matplotlib")
        assert out == tmp_path / "t.mp4" and out.stat().st_size > 0


# --- framing and agreement -----------------------------------------------------------------------

def test_framing_is_scale_and_translation_invariant(tmp_path):
    v, f = torus(stretch=1.3)
    a = read(render_mesh(tmp_path / "a.png", v, f, window_size=SMALL, backend="matplotlib"))
    b = read(render_mesh(tmp_path / "b.png", 10.0 * v + 3.0, f, window_size=SMALL, backend="matplotlib"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_side_by_side_panels_share_camera(tmp_path):
    v, f = torus(stretch=1.3)
    img = read(render_side_by_side(tmp_path / "s.png", (v, f), (v, f), titles=(None, None), window_size=(320, 160),
                                   backend="matplotlib")).astype(int)
    assert np.abs(img[:, :160] - img[:, 160:]).mean() < 1.0
    # A smaller right panel object is drawn smaller (one scale for both panels).
    img2 = read(render_side_by_side(tmp_path / "t.png", (v, f), (0.5 * v, f), titles=(None, None),
                                    window_size=(320, 160), backend="matplotlib"))
    drawn = np.abs(img2.astype(int) - 255).sum(-1) > 30
    assert drawn[:, 160:].sum() < 0.5 * drawn[:, :160].sum()


def test_backends_agree_on_silhouette(tmp_path):
    if render_backend("auto") != "pyvista":
        pytest.skip("pyvista off-screen rendering is not available here")
    # Big stretched torus + small torus off to one side: no mirror symmetry, so a flipped axis shows.
    v1, f1 = torus(stretch=1.3, n_u=64, n_v=32)
    v2, f2 = torus(R=0.08, r=0.04, n_u=24, n_v=12)
    v = np.concatenate([v1, v2 + [0.25, 0.2, 0.15]])
    f = np.concatenate([f1, f2 + len(v1)])
    masks = []
    for b in ("pyvista", "matplotlib"):
        img = read(render_mesh(tmp_path / f"{b}.png", v, f, camera=(20.0, 40.0), window_size=(200, 150), backend=b))
        masks.append(np.abs(img.astype(int) - 255).sum(-1) > 30)
    iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
    assert iou(masks[0], masks[1]) > 0.9
    assert iou(masks[0], masks[1][:, ::-1]) < iou(masks[0], masks[1]) - 0.1  # the test can see a mirror


def test_empty_mesh_is_well_formed(tmp_path):
    out = render_mesh(tmp_path / "e.png", np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), title="empty",
                      window_size=SMALL, backend="matplotlib")
    assert read(out).shape == (SMALL[1], SMALL[0], 3)


# --- backend selection ---------------------------------------------------------------------------

def test_auto_falls_back_to_matplotlib_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "_PROBE", {"ok": False, "reason": "no OpenGL (test)", "window": None})
    monkeypatch.setattr(render, "_WARNED", set())
    monkeypatch.delenv("DIFFWORLD_RENDER_BACKEND", raising=False)
    v, f = torus()
    with pytest.warns(RuntimeWarning, match="matplotlib fallback"):
        out = render_mesh(tmp_path / "m.png", v, f, window_size=SMALL)
    assert_not_blank(read(out))
    with pytest.raises(RuntimeError, match="no OpenGL"):
        render_backend("pyvista")


def test_auto_falls_back_when_pyvista_raises(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("GL context lost (test)")

    monkeypatch.setattr(render, "_PROBE", {"ok": True, "reason": "", "window": None})
    monkeypatch.setattr(render, "_WARNED", set())
    monkeypatch.setattr(render, "_render_pyvista", broken)
    monkeypatch.delenv("DIFFWORLD_RENDER_BACKEND", raising=False)
    v, f = torus()
    with pytest.warns(RuntimeWarning, match="GL context lost") as record:
        out = render_mesh(tmp_path / "m.png", v, f, window_size=SMALL)
    assert record[0].filename == __file__  # the warning points at the caller
    assert_not_blank(read(out))
    with pytest.raises(RuntimeError, match="GL context lost"):
        render_mesh(tmp_path / "n.png", v, f, window_size=SMALL, backend="pyvista")


def test_env_override(monkeypatch):
    monkeypatch.setenv("DIFFWORLD_RENDER_BACKEND", "matplotlib")
    assert render_backend() == "matplotlib"
    monkeypatch.setenv("DIFFWORLD_RENDER_BACKEND", "vulkan")
    with pytest.raises(ValueError, match="DIFFWORLD_RENDER_BACKEND"):
        render_backend()


# --- errors name the argument --------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda p, v, f: render_mesh(p, v[:, :2], f), "'vertices'"),
    (lambda p, v, f: render_mesh(p, v, f[:, :2]), "'faces'"),
    (lambda p, v, f: render_mesh(p, v, f + len(v)), r"'faces' indices must lie in \[0, "),
    (lambda p, v, f: render_mesh(p, v, f - 1), r"'faces' indices must lie in \[0, "),
    (lambda p, v, f: render_mesh(p, v, f, camera="fisheye"), "'camera'"),
    (lambda p, v, f: render_mesh(p, v, f, camera=(1.0,)), "'camera'"),
    (lambda p, v, f: render_mesh(p, v, f, camera=(0.0, 120.0)), "'camera'"),
    (lambda p, v, f: render_mesh(p, v, f, target=v[:, :2]), "'target'"),
    (lambda p, v, f: render_mesh(p, v, f, target=(v, f + len(v))), r"'target\[1\]'"),
    (lambda p, v, f: render_mesh(p, v, f, window_size=(0, 10)), "'window_size'"),
    (lambda p, v, f: render_mesh(p, v, f, color="not-a-color"), "'color'"),
    (lambda p, v, f: render_mesh(p, v, f, backend="opengl"), "'backend'"),
    (lambda p, v, f: render_mesh(p.with_suffix(".bmp"), v, f), "'path'"),
    (lambda p, v, f: render_mesh(p, np.full_like(v, math.nan), f), "'vertices'"),
    (lambda p, v, f: render_side_by_side(p, v, v), "'left'"),
    (lambda p, v, f: render_side_by_side(p, (v, f), v[:, :1]), "'right'"),
    (lambda p, v, f: render_side_by_side(p, (v, f), (v, f), titles=("a",)), "'titles'"),
    (lambda p, v, f: render_points(p, v, v[:, 0][:-1]), "'colors'"),
    (lambda p, v, f: render_points(p, v, point_size=-1), "'point_size'"),
    (lambda p, v, f: render_points(p, v, v[:, 0], cmap="no-such-map"), "'cmap'"),
    (lambda p, v, f: render_turntable(p.with_suffix(".gif"), v, f, n_frames=0), "'n_frames'"),
    (lambda p, v, f: render_turntable(p.with_suffix(".gif"), v, f, fps=0), "'fps'"),
    (lambda p, v, f: render_turntable(p, v, f), "'path'"),
    (lambda p, v, f: render_particles(p, [(v, None)], surfaces=[[(v, f, v[:2])]]), r"'surfaces\[0\]\[0\]\[2\]'"),
    (lambda p, v, f: render_particles(p, [(v, None)], surfaces=[[(v, f)]]), r"'surfaces\[0\]\[0\]'"),
    (lambda p, v, f: render_particles(p, [(v, None)], surfaces=[[(v, f, v)]], surface_opacity=0),
     "'surface_opacity'"),
    (lambda p, v, f: render_particles(p.with_suffix(".gif"), [(v, None)] * 2, surfaces=[[]]), "'surfaces' with one"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(tmp_path, call, match):
    v, f = torus(n_u=8, n_v=4)
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "x.png", v, f)
    assert not list(tmp_path.iterdir())


def test_bad_types_raise_type_error(tmp_path):
    v, f = torus(n_u=8, n_v=4)
    with pytest.raises(TypeError, match="'faces'"):
        render_mesh(tmp_path / "x.png", v, f.astype(np.float64))
    with pytest.raises(TypeError, match="'vertices'"):
        render_mesh(tmp_path / "x.png", "vertices", f)
    with pytest.raises(TypeError, match="'path'"):
        render_mesh(3, v, f)
