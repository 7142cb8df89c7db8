"""Hostile scene files and command lines get a clean message and exit code 2, fast, never a
traceback: alias bombs, deep nesting, bad encodings, duplicate keys, huge values, overrides onto
malformed sections, unwritable outputs; plus a fuzz test of the loader over every shipped scene."""

import codecs
import copy
import os
import random
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffworld.app.cli import app
from diffworld.app.scenes import SceneError, load_scene

ROOT = Path(__file__).resolve().parents[2]
SCENES = sorted((ROOT / "scenes").glob("*.yaml"))
PUSH = ROOT / "scenes" / "mpm_push_plasticine.yaml"
runner = CliRunner()


def _validate(path: Path, *extra: str):
    t = time.perf_counter()
    result = runner.invoke(app, ["validate", str(path), *extra])
    return result, time.perf_counter() - t


def _clean_error(result, *wanted: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output[-500:])
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.output) < 4000, len(result.output)
    for w in wanted:
        assert w in result.output, (w, result.output[-800:])


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nversion: 1\n")
    result, seconds = _validate(bomb)
    _clean_error(result, "bomb.yaml", "values once aliases", "expanded")
    assert seconds < 20  # 81 s and 6.6 GB before
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("a: &a [*a]\n")
    _clean_error(_validate(recursive)[0], "recursive structure")


def test_a_few_aliases_are_fine(tmp_path):
    text = PUSH.read_text().replace("max_speed: 1.0", "max_speed: &speed 1.0\n    max_angular_speed: *speed")
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    result, _ = _validate(path)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("text", ["x: " + "[" * 10000 + "]" * 10000 + "\n",
                                  "".join("  " * i + f"k{i}:\n" for i in range(1000)) + "  " * 1000 + "v: 1\n",
                                  "x: " + "[" * 70 + "]" * 70 + "\n"])
def test_deep_nesting_is_refused(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    _clean_error(_validate(path)[0], "deep.yaml", "levels")


def test_encodings(tmp_path):
    text = PUSH.read_text()
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"# caf\xe9 au lait\n" + text.encode())
    _clean_error(_validate(bad)[0], "line 1, column 6", "0xe9", "UTF-8")
    bad.write_bytes(text.encode() + b"\xff\xfe")
    _clean_error(_validate(bad)[0], "0xff")
    for name, raw in (("bom8.yaml", codecs.BOM_UTF8 + text.encode()), ("utf16.yaml", text.encode("utf-16")),
                      ("utf16be.yaml", codecs.BOM_UTF16_BE + text.encode("utf-16-be"))):
        (tmp_path / name).write_bytes(raw)
        result, _ = _validate(tmp_path / name)
        assert result.exit_code == 0, (name, result.output)


def test_duplicate_keys_name_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(PUSH.read_text().replace("seed: 0", "seed: 0\nseed: 3"))
    _clean_error(_validate(path)[0], "duplicate key 'seed'", "first at line 6, again at line 7")


def test_huge_values_are_cut_short_in_messages(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(PUSH.read_text().replace("name: mpm_push_plasticine", "name: " + "x" * 1_000_000))
    result, _ = _validate(path)
    _clean_error(result, "long.yaml: name:")
    big = tmp_path / "big.yaml"
    big.write_text(PUSH.read_text() + "# " + "y" * (9 * 1024 * 1024) + "\n")
    _clean_error(_validate(big)[0], "bytes; a scene file is at most")


def test_overrides_onto_malformed_sections(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(PUSH.read_text().replace("optimizer: {name: adam, lr: 0.05, iterations: 30, clip_grad_norm: 10.0}",
                                             "optimizer: 5"))
    result = runner.invoke(app, ["optimize", str(path), "-n", "3", "--out", str(tmp_path / "o")])
    _clean_error(result, "optimizer: expected a mapping (to set optimizer.iterations")
    path.write_text(PUSH.read_text().replace("runtime: {device: auto, dtype: float32}", "runtime: cpu"))
    result = runner.invoke(app, ["run", str(path), "--device", "cpu", "--out", str(tmp_path / "o")])
    _clean_error(result, "runtime: expected a mapping")
    path.write_text(PUSH.read_text().replace("device: auto", "device: ''"))
    _clean_error(_validate(path)[0], "runtime.device")


def test_unwritable_or_wrong_outputs(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    result = runner.invoke(app, ["run", str(PUSH), "--out", str(a_file)])
    _clean_error(result, "exists and is not a folder")
    result = runner.invoke(app, ["run", str(tmp_path)])
    _clean_error(result, "is a folder; expected a scene file")
    result = runner.invoke(app, ["schema", "--out", "/proc/diffworld-schema.json"])
    _clean_error(result, "--out: cannot write")
    mesh = tmp_path / "m.obj"
    mesh.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    result = runner.invoke(app, ["render", str(mesh), "--out", "/proc/diffworld.png"])
    _clean_error(result, "--out: cannot write")
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        result = runner.invoke(app, ["run", str(PUSH), "--out", str(ro / "run")])
        _clean_error(result, "--out")


# --- fuzz ---------------------------------------------------------------------------------------

def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**40, max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", "auto", "cpu", "1e-3", "inf", "-1", "box", "water", "grid", "adam", "*", "&a"]),
    st.lists(st.floats(allow_nan=True), max_size=5), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(scene=st.sampled_from(SCENES), seed=st.integers(0, 2**32 - 1), value=VALUES,
       action=st.sampled_from(["set", "delete", "add", "text"]))
def test_fuzzed_scenes_give_a_scene_error_or_a_scene(tmp_path_factory, scene, seed, value, action):
    """Every mutation of a shipped scene either validates or raises SceneError naming the file,
    quickly; nothing else escapes."""
    rng = random.Random(seed)
    text = scene.read_text()
    data = yaml.safe_load(text)
    if action == "text":  # a byte-level edit: delete, duplicate or replace a random slice
        i = rng.randrange(len(text))
        j = min(len(text), i + rng.randrange(1, 40))
        text = rng.choice([text[:i] + text[j:], text[:j] + text[i:j] + text[j:],
                           text[:i] + str(value) + text[j:]])
    else:
        data = copy.deepcopy(data)
        path = rng.choice([p for p in _paths(data) if p])
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if action == "set":
            parent[path[-1]] = value
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[f"unknown_{seed % 97}"] = value
        else:
            parent.append(value)
        text = yaml.safe_dump(data, allow_unicode=True)
    folder = tmp_path_factory.mktemp("fuzz")
    out = folder / scene.name
    out.write_text(text, encoding="utf-8")
    for asset in (ROOT / "scenes" / "assets").glob("*"):
        (folder / "assets").mkdir(exist_ok=True)
        (folder / "assets" / asset.name).write_bytes(asset.read_bytes())
    t = time.perf_counter()
    try:
        load_scene(out)
    except SceneError as exc:
        message = str(exc)
        assert message.startswith(str(out)), message[:300]
        assert len(message) < 8000
    assert time.perf_counter() - t < 30
