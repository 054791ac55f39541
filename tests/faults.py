"""Fault injection for the reliability tests: run an entry point in-process and capture what
it prints, and (as a script) a training subprocess that a fault hits at a chosen step.

    python tests/faults.py signal-at STEP SIGNAL -- <mpcl.train args>  # kill(self) mid-step
    (``SignalAt`` does the same in-process)
    python tests/faults.py hang-in-save STEP -- <mpcl.train args>      # half-write, then hang
    python tests/faults.py slow SECONDS -- <mpcl.train args>           # sleep after each step
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout

import lightning as L

# A smaller student than model=small: half the parameters, checkpoints of ~30 MB.
TINY_MODEL = [
    "model.encoder.depths=[1,1,1,1]",
    "model.decode_head.embed_dim=32",
    "model.proto_head.embed_dim=32",
    "model.proto_head.proto_dim=32",
]


def run_main(main: Callable[[], None], argv: list[str]) -> tuple[int, str, str]:
    """Run a console entry (``mpcl.train.main`` ...) in this process as ``prog argv``;
    returns (exit status, stdout, stderr). Logging is put back as it was."""
    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved_argv = sys.argv
    sys.argv = [main.__module__, *argv]
    out, err = io.StringIO(), io.StringIO()
    GlobalHydra.instance().clear()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


class SignalAt(L.Callback):
    """Sends this process ``signum`` in the middle of step ``step`` (before its optimizer
    step), as a user or a scheduler would."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


# ---------------------------------------------------------------------- the subprocess side
def _with_callback(callback) -> None:
    import mpcl.train

    build = mpcl.train.build

    def patched(cfg, *args):
        datamodule, module, trainer = build(cfg, *args)
        trainer.callbacks.insert(0, callback)
        return datamodule, module, trainer

    mpcl.train.build = patched


def _inject(kind: str, arg: str, extra: str | None) -> None:
    import torch

    if kind == "signal-at":  # a real signal, delivered in the middle of step `arg`
        _with_callback(SignalAt(int(arg), int(getattr(signal, extra))))
    elif kind == "hang-in-save":  # the save of step `arg` writes 64 KiB, then hangs
        step, real_save = int(arg), torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("global_step") == step:
                f.write(b"\0" * 65536)
                f.flush()
                print(f"HANG-IN-SAVE {getattr(f, 'name', f)}", flush=True)
                time.sleep(600)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif kind == "slow":
        seconds = float(arg)

        class Slow(L.Callback):
            def on_train_batch_end(self, *args):
                time.sleep(seconds)

        _with_callback(Slow())
    else:
        raise SystemExit(f"unknown fault {kind}")


if __name__ == "__main__":
    split = sys.argv.index("--")
    fault, train_args = sys.argv[1:split], sys.argv[split + 1 :]
    _inject(fault[0], fault[1], fault[2] if len(fault) > 2 else None)
    import mpcl.train

    sys.argv = ["mpcl.train", *train_args]
    mpcl.train.main()
