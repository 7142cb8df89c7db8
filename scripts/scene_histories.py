"""Record or compare the loss histories of every shipped scene, run reduced on the CPU.

A refactoring that must not change numbers is checked by recording before and comparing after:

    python scripts/scene_histories.py record before.json
    ...change the code...
    python scripts/scene_histories.py record after.json
    python scripts/scene_histories.py compare before.json after.json   # exit 1 on any difference

Every cell of each scene's ``log.csv`` (loss, its terms, learning rates, stages) is kept as the
exact text the driver wrote, so "identical" means bit for bit. The reduced sizes are those of
the CUDA scene tests (``tests/cuda/test_cuda_parity.py``: a few iterations on small grids).
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


WALL_CLOCK = ("time_s",)  # differs between runs by nature


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in WALL_CLOCK}


def record(path: Path, names: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "cuda"))
    import test_cuda_parity as scenes  # the reduced-scene table and runner

    out = {}
    for name in names or sorted(scenes.SCENE_OVERRIDES):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            scenes._run_scene(name, scenes.CPU, Path(tmp))
            rows = list(csv.DictReader(open(Path(tmp) / "log.csv")))
        out[name] = [_numbers(r) for r in rows]
        print(f"{name}: {len(rows)} rows, last loss {rows[-1]['loss']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    path.write_text(json.dumps(out, indent=1))


def compare(a: Path, b: Path) -> int:
    x, y = ({n: [_numbers(r) for r in rows] for n, rows in json.loads(p.read_text()).items()} for p in (a, b))
    bad = 0
    for name in sorted(set(x) | set(y)):
        if x.get(name) != y.get(name):
            bad += 1
            print(f"DIFFERENT {name}")
            for i, (r, s) in enumerate(zip(x.get(name, []), y.get(name, []))):
                diff = {k: (r.get(k), s.get(k)) for k in set(r) | set(s) if r.get(k) != s.get(k)}
                if diff:
                    print(f"  row {i}: {diff}")
                    break
        else:
            print(f"identical {name} ({len(x[name])} rows)")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "record":
        record(Path(sys.argv[2]), sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
