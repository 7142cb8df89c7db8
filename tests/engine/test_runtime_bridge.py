"""Runtime (devices, dtypes) and the torch<->Warp bridge (tape op vs finite differences)."""

import pytest
import torch
import warp as wp

from diffworld.engine.bridge import check_tensor, tape_apply, to_warp
from diffworld.engine.gradcheck import directional_check
from diffworld.engine.runtime import get_runtime, resolve_device, resolve_dtype, torch_threads, warp_device


@wp.kernel
def _cubic_kernel(x: wp.array(dtype=wp.float64), y: wp.array(dtype=wp.float64), out: wp.array(dtype=wp.float64)):
    i = wp.tid()
    out[i] = x[i] * x[i] * x[i] + wp.sin(y[i]) * x[i]


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert warp_device(torch.device("cpu")) == "cpu"
    assert resolve_dtype("float64") is torch.float64
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda:3")
    rt = get_runtime("cpu", "float64")
    assert rt.warp_device == "cpu" and rt.dtype is torch.float64


def test_torch_threads_context_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_to_warp_is_zero_copy():
    t = torch.zeros(5, dtype=torch.float32)
    a = to_warp(t)
    a.fill_(2.0)
    assert torch.all(t == 2.0)


def test_tape_op_gradient_matches_finite_differences():
    def fwd(wp_in):
        x, y = wp_in
        out = wp.zeros(x.shape[0], dtype=wp.float64, device=x.device, requires_grad=True)
        wp.launch(_cubic_kernel, dim=x.shape[0], inputs=[x, y], outputs=[out], device=x.device)
        return [out]

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randn(16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, generator=gen)

    def loss(a, b):
        (out,) = tape_apply(fwd, a, b)
        return (out * w).sum()

    for c in directional_check(loss, [x, y], eps=1e-6):
        assert c.rel_error < 1e-7, c
    # The op owns its buffers: the caller's leaves get a fresh gradient, never Warp's.
    loss(x, y).backward()
    expected = (3 * x.detach() ** 2 + torch.sin(y.detach())) * w
    assert torch.allclose(x.grad, expected)


def test_check_tensor_messages():
    with pytest.raises(ValueError, match=r"Expected 'pts' of shape \(\*, 3\), got \(4, 2\)"):
        check_tensor("pts", torch.zeros(4, 2), shape=(None, 3))
    with pytest.raises(TypeError, match="'pts' to be a torch.Tensor"):
        check_tensor("pts", [1, 2, 3])
    with pytest.raises(ValueError, match="non-finite"):
        check_tensor("pts", torch.tensor([1.0, float("inf")]))


def test_one_kernel_cache_by_default(monkeypatch, tmp_path):
    """The command line, make, the tests and the benchmarks share one Warp kernel cache: diffworld's
    user cache folder unless $DIFFWORLD_WARP_CACHE or $WARP_CACHE_PATH says otherwise."""
    import os

    from platformdirs import user_cache_dir

    from diffworld.engine.runtime import kernel_cache_dir

    monkeypatch.delenv("DIFFWORLD_WARP_CACHE", raising=False)
    monkeypatch.delenv("WARP_CACHE_PATH", raising=False)
    assert kernel_cache_dir() == os.path.join(user_cache_dir("diffworld", appauthor=False), "warp")
    monkeypatch.setenv("WARP_CACHE_PATH", str(tmp_path / "warp"))
    assert kernel_cache_dir() == str(tmp_path / "warp")
    monkeypatch.setenv("DIFFWORLD_WARP_CACHE", str(tmp_path / "dw"))
    assert kernel_cache_dir() == str(tmp_path / "dw")


def test_a_cuda_request_without_a_driver_names_the_driver():
    from diffworld.engine.runtime import cuda_unavailable_reason

    if wp.is_cuda_available():
        pytest.skip("a CUDA device is there")
    with pytest.raises(ValueError, match="'cuda' requested but Warp sees 0 CUDA device") as info:
        resolve_device("cuda")
    if cuda_unavailable_reason() is not None:  # no driver at all (not a driver without a GPU)
        assert "could not find or load the NVIDIA CUDA driver" in str(info.value)
