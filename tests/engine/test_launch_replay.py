"""bridge.launch(replay=True): a recorded CPU launch replayed with only the changed arguments set
gives what wp.launch gives, forward and adjoint, whatever changes between calls, both through the
kept argument structures (the direct call) and through Warp's ``Launch.launch`` (its fallback);
it keeps no array alive; concurrent threads replay their own records."""

import gc
import threading
import weakref

import pytest
import torch
import warp as wp

from diffworld.engine import bridge
from diffworld.engine.bridge import arg_view, launch
from diffworld.engine.runtime import init_warp

init_warp()


@pytest.fixture(params=["direct call", "Launch.launch"])
def replay_path(request, monkeypatch):
    """Each replay test runs through both replay paths, from fresh records."""
    if request.param == "Launch.launch":
        monkeypatch.setattr(bridge._DirectCall, "of", classmethod(lambda cls, cmd: None))
    bridge._RECORDED.clear()
    yield request.param
    bridge._RECORDED.clear()


@wp.kernel
def _affine(x: wp.array(dtype=wp.vec3d), a: wp.float64, b: wp.vec3d, k: int, y: wp.array(dtype=wp.vec3d)):
    i = wp.tid()
    y[i] = a * x[i] * wp.float64(k) + b


def _reference(x, a, b, k):
    return a * x * k + torch.tensor(b, dtype=torch.float64)


def test_replay_matches_fresh_launches_when_any_argument_changes(replay_path):
    g = torch.Generator().manual_seed(0)
    n = 37
    xs = [torch.randn(n, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    a_same, b_same = 0.5, wp.vec3d(1.0, 2.0, 3.0)
    calls = [  # (x, a, b, k): the same objects again, new tensors, new scalars, new vectors
        (0, a_same, b_same, 3), (0, a_same, b_same, 3), (1, a_same, b_same, 3), (1, -2.0, b_same, 3),
        (2, -2.0, wp.vec3d(0.0, -1.0, 4.0), 7), (0, a_same, b_same, 3), (2, 1e-3, b_same, 1),
    ]
    for xi, a, b, k in calls:
        y = torch.empty(n, 3, dtype=torch.float64)
        launch(_affine, n, [arg_view(xs[xi], wp.vec3d, (n,)), a, b, k], "cpu", [arg_view(y, wp.vec3d, (n,))],
               replay=True)
        assert torch.equal(y, _reference(xs[xi], a, tuple(b), k))
    # a plain wp.array argument (not a descriptor) is set at every replay as well
    for xi in (0, 1, 0):
        y = torch.empty(n, 3, dtype=torch.float64)
        launch(_affine, n, [wp.from_torch(xs[xi], dtype=wp.vec3d), 2.0, b_same, 2], "cpu",
               [wp.from_torch(y, dtype=wp.vec3d)], replay=True)
        assert torch.equal(y, _reference(xs[xi], 2.0, tuple(b_same), 2))


def test_replayed_adjoint_matches_the_analytic_adjoint(replay_path):
    n = 11
    g = torch.Generator().manual_seed(1)
    for rep in range(3):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        gy = torch.randn(n, 3, generator=g, dtype=torch.float64)
        gx = torch.zeros(n, 3, dtype=torch.float64)
        y = torch.empty(n, 3, dtype=torch.float64)
        a = 0.25 * (rep + 1)
        launch(_affine, n, [arg_view(x, wp.vec3d, (n,)), a, wp.vec3d(), 2], "cpu", [arg_view(y, wp.vec3d, (n,))],
               adjoint=True, adj_inputs=[arg_view(gx, wp.vec3d, (n,)), 0.0, wp.vec3d(), 0],
               adj_outputs=[arg_view(gy, wp.vec3d, (n,))], replay=True)
        assert torch.allclose(gx, a * 2 * gy, rtol=1e-15, atol=0)


def test_a_record_keeps_no_array_alive():
    n = 5
    x = wp.zeros(n, dtype=wp.vec3d, device="cpu")  # owns its memory
    y = wp.zeros(n, dtype=wp.vec3d, device="cpu")
    launch(_affine, n, [x, 1.0, wp.vec3d(), 1], "cpu", [y], replay=True)
    launch(_affine, n, [x, 1.0, wp.vec3d(), 1], "cpu", [y], replay=True)
    refs = weakref.ref(x), weakref.ref(y)
    del x, y
    gc.collect()
    assert all(r() is None for r in refs)


def test_threads_replay_their_own_records(replay_path):
    n = 4096
    results, errors = {}, []

    def work(t):
        try:
            g = torch.Generator().manual_seed(t)
            for _ in range(20):
                x = torch.randn(n, 3, generator=g, dtype=torch.float64)
                y = torch.empty_like(x)
                launch(_affine, n, [arg_view(x, wp.vec3d, (n,)), float(t), wp.vec3d(), 1], "cpu",
                       [arg_view(y, wp.vec3d, (n,))], replay=True)
                if not torch.equal(y, x * t):
                    errors.append(t)
            results[t] = True
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(1, 5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 4


def test_arg_view_checks_the_shape():
    t = torch.zeros(6, 3, 3)
    with pytest.raises(ValueError, match="arg_view"):
        arg_view(t, wp.mat33, (5,))
    with pytest.raises(ValueError, match="contiguous"):
        arg_view(torch.zeros(3, 6).t(), wp.float32, (6, 3))
    # a transposed view of a viewed tensor: the same address and shape, refused all the same
    sq = torch.zeros(4, 4)
    arg_view(sq, wp.float32, (4, 4))
    with pytest.raises(ValueError, match="contiguous"):
        arg_view(sq.t(), wp.float32, (4, 4))


def test_arg_view_checks_the_dtype_and_keeps_no_tensor_alive():
    with pytest.raises(ValueError, match="arg_view: a torch.float64 tensor cannot be viewed as mat33f"):
        arg_view(torch.zeros(4, 3, 3, dtype=torch.float64), wp.mat33, (4,))
    with pytest.raises(ValueError, match=r"arg_view: a tensor of shape \(4, 9\) viewed as mat33f"):
        arg_view(torch.zeros(4, 9), wp.mat33, (4, 1))
    # the same bytes in other legal shapes: (n, 3, 3) as n mat33, as (n, 9) scalars, (n, 3) as n vec3
    t = torch.arange(36, dtype=torch.float64).reshape(4, 3, 3)
    for dtype, shape in ((wp.mat33d, (4,)), (wp.float64, (4, 3, 3)), (wp.vec3d, (4, 3))):
        d = arg_view(t, dtype, shape)
        assert d.data == t.data_ptr() and d.ndim == len(shape) and tuple(d.shape[:d.ndim]) == shape
        assert tuple(d.strides[:d.ndim]) == tuple(s * 8 for s in t.reshape(*shape, -1).stride()[:len(shape)])
    x = torch.zeros(1000, 3, dtype=torch.float64)
    ref = weakref.ref(x)
    y = torch.empty_like(x)
    launch(_affine, 1000, [arg_view(x, wp.vec3d, (1000,)), 1.0, wp.vec3d(1.0, 2.0, 3.0), 1], "cpu",
           [arg_view(y, wp.vec3d, (1000,))], replay=True)
    assert torch.equal(y, x + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    del x
    gc.collect()
    assert ref() is None  # the cached descriptor does not own the tensor


def test_replay_skips_only_arguments_equal_to_the_recorded_ones(replay_path):
    """Numbers, Warp scalars and vectors are compared by exact value (new objects of the same value
    need no re-set; -0.0 is not 0.0; a vector changed in place is a change)."""
    n = 8
    x = torch.rand(n, 3, dtype=torch.float64) + 0.5
    xv = arg_view(x, wp.vec3d, (n,))
    b = wp.vec3d(-0.0, -0.0, -0.0)
    cases = [(0.0, 1000, False), (-0.0, 1000, True), (-0.0, int("1000"), True), (0.0, 999 + 1, False),
             (wp.float64(0.0), 1000, False), (wp.float64(-0.0), 1000, True), (2.0, 3, False)]
    for a, k, negative_zero in cases:
        y = torch.empty(n, 3, dtype=torch.float64)
        launch(_affine, n, [xv, a, b, k], "cpu", [arg_view(y, wp.vec3d, (n,))], replay=True)
        a_val = a.value if hasattr(a, "value") else a
        assert torch.equal(y, a_val * x * k + torch.tensor(tuple(b), dtype=torch.float64))
        if a_val == 0.0:
            assert bool(torch.signbit(y).all()) == negative_zero, (a, k)
    c = wp.vec3d(1.0, 2.0, 3.0)
    for value in (1.0, 5.0, 5.0, -1.0):
        c[1] = value  # the same vector object, changed in place
        y = torch.empty(n, 3, dtype=torch.float64)
        launch(_affine, n, [xv, 1.0, c, 1], "cpu", [arg_view(y, wp.vec3d, (n,))], replay=True)
        assert torch.equal(y, x + torch.tensor((1.0, value, 3.0), dtype=torch.float64))


def test_replays_call_the_kernel_directly_with_this_warp():
    """The fast path is taken (a Warp whose argument structures are laid out otherwise would fall
    back to Launch.launch silently: this test says so instead), forward and adjoint."""
    bridge._RECORDED.clear()
    n = 3
    x, y, gx, gy = (torch.zeros(n, 3, dtype=torch.float64) for _ in range(4))
    for adjoint in (False, True):
        kw = dict(adjoint=True, adj_inputs=[arg_view(gx, wp.vec3d, (n,)), 0.0, wp.vec3d(), 0],
                  adj_outputs=[arg_view(gy, wp.vec3d, (n,))]) if adjoint else {}
        launch(_affine, n, [arg_view(x, wp.vec3d, (n,)), 1.0, wp.vec3d(), 1], "cpu", [arg_view(y, wp.vec3d, (n,))],
               replay=True, **kw)
    records = [rec for key, rec in bridge._RECORDED.items() if key[0] is _affine]
    assert len(records) == 2 and all(isinstance(rec[3], bridge._DirectCall) for rec in records)
    bridge._RECORDED.clear()


@wp.kernel
def _read2d(a: wp.array2d(dtype=wp.float32), out: wp.array2d(dtype=wp.float32)):
    i, j = wp.tid()
    out[i, j] = a[i, j] * 2.0


def test_strided_arg_view_reads_transposed_and_sliced_matrices_in_place():
    from diffworld.engine.bridge import strided_arg_view

    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 40, generator=g)
    wide = torch.randn(40, 16, generator=g)
    for view in (base.t(), wide[:, :9], wide[:, 3:12], base.t()[5:35], torch.randn(40, 9, generator=g)):
        out = torch.empty(view.shape)
        for _ in range(2):  # a fresh descriptor, then the cached one
            launch(_read2d, tuple(view.shape), [strided_arg_view(view, wp.float32)], "cpu",
                   [arg_view(out, wp.float32, tuple(out.shape))], replay=True)
            assert torch.equal(out, view * 2.0)
    # random views: transposes, column and row slices, row steps, of random sizes (one row or
    # column included)
    for _ in range(200):
        rows, cols = (int(d) for d in torch.randint(1, 30, (2,), generator=g))
        big = torch.randn(rows * 3 + 2, cols * 2 + 3, generator=g)
        pick = int(torch.randint(0, 4, (1,), generator=g))
        a0, b0 = (int(d) for d in torch.randint(0, 3, (2,), generator=g))
        view = (big[a0:a0 + rows, b0:b0 + cols], big[a0:a0 + 2 * rows:2, b0:b0 + cols],
                big.t()[b0:b0 + cols, a0:a0 + rows], big[a0:a0 + 3 * rows:3, b0:b0 + 2 * cols:2])[pick]
        out = torch.empty(view.shape)
        launch(_read2d, tuple(view.shape), [strided_arg_view(view, wp.float32)], "cpu",
               [arg_view(out, wp.float32, tuple(out.shape))], replay=True)
        assert torch.equal(out, view * 2.0), (pick, tuple(view.shape), view.stride())
    with pytest.raises(ValueError, match="strided_arg_view: expected a tensor of float32 scalars"):
        strided_arg_view(torch.zeros(4, 9, dtype=torch.float64), wp.float32)
    with pytest.raises(ValueError, match="strided_arg_view: expected a Warp scalar type"):
        strided_arg_view(torch.zeros(4, 3), wp.vec3)
    with pytest.raises(ValueError, match="1 to 4 dimensions"):
        strided_arg_view(torch.zeros(()), wp.float32)


def test_arg_view_misses_reuse_the_layout_checks_but_not_the_address():
    """A miss copies its layout's template: every new tensor of a known layout gets its own
    address, and a tensor of the same shape but another dtype is still refused."""
    ts = [torch.full((6, 3), float(i), dtype=torch.float64) for i in range(50)]
    views = [arg_view(t, wp.vec3d, (6,)) for t in ts]
    assert [v.data for v in views] == [t.data_ptr() for t in ts]
    for t in ts[:5]:
        y = torch.empty_like(t)
        launch(_affine, 6, [arg_view(t, wp.vec3d, (6,)), 1.0, wp.vec3d(), 1], "cpu", [arg_view(y, wp.vec3d, (6,))],
               replay=True)
        assert torch.equal(y, t)
    with pytest.raises(ValueError, match="float32 tensor cannot be viewed as vec3d"):
        arg_view(torch.zeros(6, 3), wp.vec3d, (6,))


@wp.kernel
def _plus_one(x: wp.array(dtype=wp.float32), y: wp.array(dtype=wp.float32)):
    i = wp.tid()
    y[i] = x[i] + 1.0


def test_a_graph_capture_records_replayed_launches():
    """Under a Warp CPU graph capture a replay=True launch goes through wp.launch, so the graph
    holds it (a direct call would run once, outside the graph, and the graph would be empty)."""
    x = wp.array([1.0, 2.0, 3.0], dtype=wp.float32, device="cpu")
    y = wp.zeros(3, dtype=wp.float32, device="cpu")
    for _ in range(2):  # a record with its direct call exists
        launch(_plus_one, 3, [x], "cpu", [y], replay=True)
    wp.capture_begin(device="cpu")
    try:
        launch(_plus_one, 3, [y], "cpu", [x], replay=True)
    finally:
        graph = wp.capture_end(device="cpu")
    x.fill_(-5.0)
    wp.capture_launch(graph)
    assert x.numpy().tolist() == [3.0, 4.0, 5.0]
    launch(_plus_one, 3, [x], "cpu", [y], replay=True)  # and replays go on after the capture
    assert y.numpy().tolist() == [4.0, 5.0, 6.0]
