"""Run ``diffworld optimize`` in this process and kill it at a chosen iteration (a helper that
tests start as a subprocess: ``python interrupt.py STAGE ITERATION SIGNAL -- <cli args>``).

The signal is sent from inside the loss function of that stage's iteration, so the run dies in
the middle of an iteration, after the last checkpoint, as a Ctrl-C or an OOM kill would leave it.
"""

import os
import signal
import sys

import diffworld.engine.problem as problem
from diffworld.app.cli import app


def main() -> None:
    stage, iteration, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1:]
    optimize = problem.optimize

    def killing(params, loss_fn, settings, out_dir, *, stage: str = "main", **kwargs):
        def loss(i):
            if stage == kill_stage and i == iteration:
                os.kill(os.getpid(), sig)
            return loss_fn(i)

        return optimize(params, loss, settings, out_dir, stage=stage, **kwargs)

    kill_stage = stage
    problem.optimize = killing
    app(args)


if __name__ == "__main__":
    main()
