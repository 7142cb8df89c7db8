"""Mesh and point-cloud I/O: round trips in every format, normals, scenes, and the error cases."""

import math

import numpy as np
import pytest
import torch
import trimesh

from diffworld.geometry.io import (
    MESH_FORMATS,
    POINT_FORMATS,
    LoadedMesh,
    LoadedPoints,
    load_mesh,
    load_points,
    save_mesh,
    save_points,
)


def ico(subdivisions=2, scale=0.3, offset=(1e-4, 2.0, -3.0)):
    m = trimesh.creation.icosphere(subdivisions)
    v = torch.tensor(m.vertices, dtype=torch.float32) * scale + torch.tensor(offset)
    return v, torch.tensor(m.faces, dtype=torch.int64)


def triangle_soup(v, f):
    """Sorted rows of face corner coordinates: equal for the same triangles in any vertex order."""
    corners = v[f].reshape(-1, 9).numpy()
    return corners[np.lexsort(corners.T[::-1])]


# --- meshes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", MESH_FORMATS)
def test_mesh_round_trip(tmp_path, ext):
    v, f = ico()
    path = tmp_path / f"mesh{ext}"
    save_mesh(path, v, f)
    loaded = load_mesh(path)
    assert isinstance(loaded, LoadedMesh)
    assert loaded.vertices.dtype == torch.float32 and loaded.faces.dtype == torch.int64
    assert loaded.faces.shape == f.shape
    if ext == ".stl":
        # STL stores triangle corners; they are welded back (order of first use), not renumbered
        # like the source, so compare the triangles themselves (orientation included).
        assert loaded.vertices.shape == v.shape
        np.testing.assert_array_equal(triangle_soup(loaded.vertices, loaded.faces), triangle_soup(v, f))
        assert np.array_equal(loaded.vertices[loaded.faces].numpy(), v[f].numpy())  # same face order
    else:
        assert torch.equal(loaded.vertices, v) and torch.equal(loaded.faces, f)


@pytest.mark.parametrize("ext", [".obj", ".off"])
def test_text_formats_keep_float64_digits(tmp_path, ext):
    v, f = ico()
    v64 = v.double() + 1e-12
    save_mesh(tmp_path / f"m{ext}", v64, f)
    text = (tmp_path / f"m{ext}").read_text()
    # 17 significant digits are written, so a float64 reader would get the exact values back.
    first = [float(x) for x in text.splitlines()[1 if ext == ".obj" else 2].split()[-3:]]
    assert first == v64[0].tolist()


def test_extension_is_case_insensitive_and_str_paths(tmp_path):
    v, f = ico(1)
    path = str(tmp_path / "MESH.PLY")
    save_mesh(path, v, f)
    assert torch.equal(load_mesh(path).faces, f)


def test_glb_scene_with_several_meshes_is_concatenated(tmp_path):
    a = trimesh.creation.box(extents=(1, 1, 1))
    b = trimesh.creation.icosphere(1, radius=0.5)
    scene = trimesh.Scene()
    scene.add_geometry(a, node_name="box")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, 0.0, 0.0)
    scene.add_geometry(b, node_name="ball", transform=shift)
    path = tmp_path / "scene.glb"
    scene.export(str(path))
    v, f = load_mesh(path)
    assert v.shape[0] == len(a.vertices) + len(b.vertices)
    assert f.shape[0] == len(a.faces) + len(b.faces)
    assert int(f.max()) == v.shape[0] - 1
    # The ball's transform was applied: its vertices are centred at x = 5, the box's at 0.
    far = v[:, 0] > 2.5
    assert int(far.sum()) == len(b.vertices)
    assert torch.allclose(v[far].mean(0), torch.tensor([5.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(v[~far].mean(0), torch.zeros(3), atol=1e-6)
    # Both parts stay closed and outward: total volume is box + ball.
    from diffworld.geometry.mesh_ops import mesh_report, mesh_volume

    assert float(mesh_volume(v.double(), f)) == pytest.approx(a.volume + b.volume, rel=1e-5)
    assert mesh_report(v, f).n_components == 2


def test_glb_mirrored_node_keeps_outward_faces(tmp_path):
    ball = trimesh.creation.icosphere(1, radius=0.5)
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    mirror[:3, 3] = (-5.0, 0.0, 0.0)
    scene = trimesh.Scene()
    scene.add_geometry(ball, node_name="mirrored", transform=mirror)
    scene.export(str(tmp_path / "mirror.glb"))
    v, f = load_mesh(tmp_path / "mirror.glb")
    from diffworld.geometry.mesh_ops import mesh_volume

    assert torch.allclose(v.mean(0), torch.tensor([-5.0, 0.0, 0.0]), atol=1e-5)
    assert float(mesh_volume(v.double(), f)) == pytest.approx(ball.volume, rel=1e-5)  # positive


def test_obj_quads_are_triangulated(tmp_path):
    path = tmp_path / "quad.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1 2 3 4\n")
    v, f = load_mesh(path)
    assert v.shape == (4, 3) and f.shape == (2, 3)


def test_device_argument(tmp_path):
    v, f = ico(1)
    save_mesh(tmp_path / "m.off", v, f)
    assert load_mesh(tmp_path / "m.off", device="cpu").vertices.device.type == "cpu"
    with pytest.raises(ValueError, match="'device'"):
        load_mesh(tmp_path / "m.off", device="not-a-device")


# --- point clouds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", POINT_FORMATS)
@pytest.mark.parametrize("with_normals", [True, False])
def test_points_round_trip(tmp_path, ext, with_normals):
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(257, 3, generator=g)
    nrm = torch.nn.functional.normalize(torch.randn(257, 3, generator=g), dim=-1) if with_normals else None
    path = tmp_path / f"cloud{ext}"
    save_points(path, pts, nrm)
    loaded = load_points(path)
    assert isinstance(loaded, LoadedPoints)
    assert loaded.points.dtype == torch.float32 and torch.equal(loaded.points, pts)
    if with_normals:
        assert torch.equal(loaded.normals, nrm)
    else:
        assert loaded.normals is None


def test_points_from_float64_xyz_and_npz(tmp_path):
    pts = torch.rand(10, 3, dtype=torch.float64)
    for ext in (".xyz", ".npz"):
        save_points(tmp_path / f"p{ext}", pts, pts)
        loaded = load_points(tmp_path / f"p{ext}")
        assert torch.equal(loaded.points, pts.float()) and torch.equal(loaded.normals, pts.float())


def test_ascii_ply_with_normals_and_faces(tmp_path):
    path = tmp_path / "ascii.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property float nx\nproperty float ny\nproperty float nz\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
        "0 0 0 0 0 1\n1 0 0 0 0 1\n0 1 0 0 0 1\n3 0 1 2\n"
    )
    pts, nrm = load_points(path)
    assert pts.shape == (3, 3) and torch.equal(nrm, torch.tensor([[0.0, 0, 1]] * 3))
    v, f = load_mesh(path)
    assert torch.equal(f, torch.tensor([[0, 1, 2]]))


def test_mesh_ply_read_as_points(tmp_path):
    v, f = ico(1)
    save_mesh(tmp_path / "m.ply", v, f)
    pts, nrm = load_points(tmp_path / "m.ply")
    assert torch.equal(pts, v) and nrm is None


def test_xyz_comments_and_commas(tmp_path):
    path = tmp_path / "c.xyz"
    path.write_text("# header\n1, 2, 3\n\n4 5 6  # trailing\n")
    pts, nrm = load_points(path)
    assert torch.equal(pts, torch.tensor([[1.0, 2, 3], [4, 5, 6]])) and nrm is None


# --- errors ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    missing = tmp_path / "nope.obj"
    with pytest.raises(FileNotFoundError, match="nope.obj"):
        load_mesh(missing)
    with pytest.raises(FileNotFoundError, match="nope.xyz"):
        load_points(tmp_path / "nope.xyz")


def test_unsupported_extension(tmp_path):
    v, f = ico(1)
    (tmp_path / "m.fbx").write_text("x")
    with pytest.raises(ValueError, match=r"'\.fbx'.*supported: \.obj, \.ply, \.stl, \.off, \.glb"):
        load_mesh(tmp_path / "m.fbx")
    with pytest.raises(ValueError, match=r"supported: \.obj"):
        save_mesh(tmp_path / "m.vtk", v, f)
    with pytest.raises(ValueError, match=r"supported: \.ply, \.xyz, \.npz"):
        load_points(tmp_path / "m.fbx")
    with pytest.raises(ValueError, match=r"supported: \.ply, \.xyz, \.npz"):
        save_points(tmp_path / "p.obj", v)
    with pytest.raises(ValueError, match=r"'\(none\)'"):
        load_mesh(tmp_path / "noext")


@pytest.mark.parametrize("ext", MESH_FORMATS)
def test_empty_and_corrupt_mesh_files(tmp_path, ext):
    empty = tmp_path / f"empty{ext}"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"empty{ext}.*empty"):
        load_mesh(empty)
    junk = tmp_path / f"junk{ext}"
    junk.write_bytes(b"this is not a mesh \x00\x01\x02 " * 20)
    with pytest.raises(ValueError, match=f"junk{ext}"):
        load_mesh(junk)


@pytest.mark.parametrize("ext", POINT_FORMATS)
def test_empty_and_corrupt_point_files(tmp_path, ext):
    empty = tmp_path / f"empty{ext}"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"empty{ext}.*empty"):
        load_points(empty)
    junk = tmp_path / f"junk{ext}"
    junk.write_bytes(b"this is not a cloud \x00\x01\x02 " * 20)
    with pytest.raises(ValueError, match=f"junk{ext}"):
        load_points(junk)


def test_point_file_content_errors(tmp_path):
    bad_cols = tmp_path / "cols.xyz"
    bad_cols.write_text("1 2 3 4\n")
    with pytest.raises(ValueError, match="line 1 has 4 columns"):
        load_points(bad_cols)
    mixed = tmp_path / "mixed.xyz"
    mixed.write_text("1 2 3\n1 2 3 0 0 1\n")
    with pytest.raises(ValueError, match="line 2 has 6 columns"):
        load_points(mixed)
    words = tmp_path / "words.xyz"
    words.write_text("1 2 three\n")
    with pytest.raises(ValueError, match="non-number"):
        load_points(words)
    comments = tmp_path / "comments.xyz"
    comments.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no points"):
        load_points(comments)
    nan = tmp_path / "nan.xyz"
    nan.write_text("1 2 nan\n")
    with pytest.raises(ValueError, match="non-finite"):
        load_points(nan)
    keys = tmp_path / "keys.npz"
    np.savez(keys, xyz=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"no array 'points' \(arrays found: \['xyz'\]\)"):
        load_points(keys)
    shape = tmp_path / "shape.npz"
    np.savez(shape, points=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"'points' of shape \(N, 3\)"):
        load_points(shape)
    no_pts = tmp_path / "none.npz"
    np.savez(no_pts, points=np.zeros((0, 3)))
    with pytest.raises(ValueError, match="holds no points"):
        load_points(no_pts)


def test_face_index_out_of_range(tmp_path):
    obj = tmp_path / "oor.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n")
    with pytest.raises(ValueError, match="oor.obj"):
        load_mesh(obj)
    off = tmp_path / "oor.off"
    off.write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 9\n")
    with pytest.raises(ValueError, match="oor.off"):
        load_mesh(off)
    ply = tmp_path / "oor.ply"
    ply.write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
        "0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n"
    )
    with pytest.raises(ValueError, match=r"oor.ply.*\[0, 3\)"):
        load_mesh(ply)
    v, f = ico(1)
    with pytest.raises(ValueError, match=r"'faces' indices must lie in \[0, 42\)"):
        save_mesh(tmp_path / "bad.obj", v, f + 1)


def test_point_cloud_file_is_not_a_mesh(tmp_path):
    save_points(tmp_path / "cloud.ply", torch.rand(10, 3))
    with pytest.raises(ValueError, match="no triangle faces.*load_points"):
        load_mesh(tmp_path / "cloud.ply")
    obj = tmp_path / "verts.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(ValueError, match="no triangle faces"):
        load_mesh(obj)


def test_save_argument_errors(tmp_path):
    v, f = ico(1)
    with pytest.raises(ValueError, match="'faces' is empty"):
        save_mesh(tmp_path / "e.ply", v, f[:0])
    with pytest.raises(TypeError, match="'faces'"):
        save_mesh(tmp_path / "e.ply", v, f.float())
    with pytest.raises(ValueError, match="'points' is empty"):
        save_points(tmp_path / "e.xyz", torch.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"'normals' of shape \(42, 3\)"):
        save_points(tmp_path / "e.xyz", v, v[:5])
    with pytest.raises(ValueError, match="non-finite"):
        save_points(tmp_path / "e.ply", torch.tensor([[0.0, math.nan, 0.0]]))
    with pytest.raises(TypeError, match="'path'"):
        load_mesh(123)
