"""What ``python -m mpcl.train`` / ``mpcl.eval`` / ``mpcl.predict`` do around Hydra.

    def main() -> None:                 # in mpcl/train.py
        run_cli("train", train)         # train(cfg, resume) -> metrics

Before Hydra creates a run directory (``run_cli``):
  1. a ``group=choice`` whose choice does not exist is one line (``check_overrides``);
  2. ``ckpt_path=<file>`` is read once (``mpcl.run.resume.CheckpointFile``); a self-describing
     checkpoint puts its own overrides before the command line's, so the run is rebuilt from
     the checkpoint alone and explicit overrides still win; the same ``CheckpointFile`` is handed to
     the task, which reads the file no more;
  3. the config is composed once and checked: a typo'd key gets one line naming it and the
     closest valid keys, bad values one line naming the key, an unusable checkpoint one line
     naming the file (a training resume with no steps left too), an unwritable log dir one
     line naming it. A rejected invocation leaves no run directory.
  4. the run directory is created and locked (``mpcl.run.rundir``: one run per directory)
     and handed to Hydra as ``hydra.run.dir``.
In the run (``report_error``): bad input is one line ``error: ...`` (exit 2), a divergence one
line (exit 3), an interrupt the saved checkpoint and the resume command (exit 130 / 143); a
run directory that holds nothing but Hydra's own files is removed again.
In a multirun each job's failure is printed, recorded in ``<job dir>/job.json`` and the next
job runs (``mpcl.run.launch``); at the end one line ``error: N of M jobs failed`` (exit 4).
``--help`` is a short usage with the entry point's examples (``usage``).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mpcl.distributed import is_rank_zero
from mpcl.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    ConfigError,
    RunInterrupted,
    SweepFailed,
    TrainingDiverged,
    UnknownKeyError,
)
from mpcl.run.config import (
    check_overrides,
    config_keys,
    hydra_error_line,
    override_key,
    validate,
)
from mpcl.run.launch import (
    JobOutcome,
    in_job_process,
    in_multirun,
    launched_sweeps,
    sweep_failure_line,
)
from mpcl.run.resume import CheckpointFile
from mpcl.run.rundir import LOCK_NAME, RunDirLock
from mpcl.run.runlog import echo, run_log

# Stored overrides that never carry over from a checkpoint, and those that carry over only
# into a resumed training run (not into eval/predict, whose configs switch them off).
_NEVER = ("ckpt_path", "hparams_search", "task_name", "hydra")
_TRAIN_ONLY = ("logger", "callbacks", "evaluate", "debug")
_HYDRA_FLAGS = ("-m", "--multirun")


def _conf_dir() -> Path:
    return Path(str(files("mpcl.conf")))


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in prefixes)


def _ckpt_argument(argv: list[str]) -> str | None:
    """The value of the last ``ckpt_path=`` on the command line (None if absent or null)."""
    ckpt = None
    for arg in argv:
        if not arg.startswith("-") and override_key(arg) == "ckpt_path" and "=" in arg:
            ckpt = arg.split("=", 1)[1]
    return None if ckpt in (None, "", "null") else ckpt


def checkpoint_overrides(argv: list[str], task: str, record: dict | None) -> list[str]:
    """The overrides stored in the checkpoint's run ``record`` that ``argv`` keeps (to go
    first).

    A stored override is dropped when the command line sets the same key (``data=cs2acdc``
    replaces a stored ``data=gta2cs``; a stored ``trainer.max_steps=...`` stays under a new
    ``trainer=gpu``), and so are those that would relaunch a sweep or, for eval/predict,
    switch loggers and callbacks back on.
    """
    if record is None:
        return []
    given = {override_key(a) for a in argv if not a.startswith("-")}
    drop = _NEVER + (() if task == "train" else _TRAIN_ONLY)
    return [
        o
        for o in record["overrides"]
        if not _under(override_key(o), drop) and override_key(o) not in given
    ]


def _check_creatable(directory: Path, key: str) -> None:
    """One line unless ``directory`` can be created (probed with a temp dir, then removed)."""
    parent = directory
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".mpcl-probe-", dir=parent))
    except OSError as e:
        raise ConfigError(
            f"cannot create the run directory {directory}: {parent} is not writable "
            f"({e.strerror or e}): set {key}=<writable dir>"
        ) from None


def precheck(task: str, argv: list[str], resume: CheckpointFile | None = None) -> Path | None:
    """Compose ``conf/<task>.yaml`` with ``argv`` as Hydra will and check it (one-line
    ConfigError), before Hydra creates the run directory; a training ``resume`` must leave
    steps to train. Returns the run directory (resolved; None in a multirun or where Hydra
    cannot resolve it)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in argv if not a.startswith("-")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("mpcl.conf", version_base="1.3"):
            try:
                cfg = compose(task, overrides=overrides, return_hydra_config=True)
            except OverrideParseException as e:
                raise ConfigError(_parse_error_line(overrides, e)) from None
            except (HydraException, OmegaConfBaseException) as e:
                line = hydra_error_line(e, _candidates(compose, task, overrides, e))
                key = re.match(r"Could not override '([^']+)'", str(e))
                if key:
                    raise UnknownKeyError(line, key.group(1)) from None
                raise ConfigError(line) from None
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    if resume is not None and task == "train":
        resume.check_steps_left(int(cfg.trainer.max_steps))
    multirun = str(OmegaConf.select(cfg, "hydra.mode")) == "RunMode.MULTIRUN"
    node = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        run_dir = OmegaConf.select(cfg, node, throw_on_resolution_failure=True)
    except OmegaConfBaseException:
        return None  # Hydra will say so itself
    given = {override_key(a) for a in overrides}
    _check_creatable(Path(str(run_dir)), node if node in given else "paths.log_dir")
    return None if multirun else Path(str(run_dir)).absolute()


def _hydra_value(text: str) -> str:
    """``text`` as one value of a Hydra override (quoted unless plainly safe)."""
    if re.fullmatch(r"[\w/.+@%-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _parse_error_line(overrides: list[str], error: Exception) -> str:
    """Name the override Hydra could not parse (its message does not)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    first = str(error).strip().splitlines()[0]
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:
            return f"cannot parse the override {override!r} ({first}): check its brackets/quotes"
    return f"cannot parse the overrides ({first})"


def _candidates(compose, task: str, overrides: list[str], error: Exception) -> list[str]:
    """The config's keys without the override that failed (for 'did you mean')."""
    text = str(error)
    bad = {o for o in overrides if f"'{override_key(o)}'" in text}
    try:
        base = compose(task, overrides=[o for o in overrides if o not in bad])
    except Exception:
        try:
            base = compose(task)
        except Exception:
            return []
    groups = sorted(p.name for p in _conf_dir().iterdir() if p.is_dir())
    return list(dict.fromkeys(config_keys(base) + groups))


def command_name(task: str) -> str:
    """The command as the user typed it: ``mpcl-train``, or ``python -m mpcl.train``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if not name or name.endswith(".py") or name.startswith(("mpcl.", "-")):
        return f"python -m mpcl.{task}"
    return name


def usage(task: str, doc: str) -> str:
    """``--help``: the usage, the examples of the entry point's docstring (the README's
    "Using it"), the config groups and their choices; the whole config is ``--cfg job``.
    ``doc``: the entry point's module docstring."""
    prog = command_name(task)
    title = " ".join(doc.strip().split("\n\n")[0].split()) or f"mpcl.{task}"
    examples = []
    for line in doc.splitlines():
        if line.startswith("    ") and line.strip():
            examples.append("  " + line.strip().replace(f"python -m mpcl.{task}", prog))
        elif examples and not line.strip():
            break  # the first indented block only
    groups = []
    for group in sorted(p for p in _conf_dir().iterdir() if p.is_dir() and p.name != "hydra"):
        choices = sorted(
            c.relative_to(group).with_suffix("").as_posix() for c in group.rglob("*.yaml")
        )
        groups.append(f"  {group.name}: {', '.join(choices)}")
    return "\n".join(
        [
            f"usage: {prog} [-m] [group=choice ...] [key=value ...]",
            "",
            title,
            "",
            "examples:",
            *examples,
            "",
            "config groups (group=choice):",
            *groups,
            "",
            f"the whole config, with your overrides:  {prog} [overrides] --cfg job",
            f"Hydra's own options:                    {prog} --hydra-help",
            "exit status: 0 done, 2 bad input, 3 diverged, 4 some sweep jobs failed, "
            "130/143 interrupted (docs/reliability.md)",
        ]
    )


def run_cli(task: str, run: Callable[[DictConfig, CheckpointFile | None], Any]) -> None:
    """Console entry of ``mpcl.<task>``: check and complete the command line (see the module
    docstring), then run ``run(cfg, resume)`` as a Hydra app inside ``report_error``;
    ``resume`` is the ``ckpt_path`` checkpoint already read (None in a multirun, whose jobs
    read their own). Returns nothing; Hydra's sweepers get ``run``'s return value."""
    import hydra

    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:  # Hydra's own is generic and dumps the config
        print(usage(task, sys.modules[run.__module__].__doc__ or ""))
        sys.exit(0)
    special = any(a.startswith("-") and a not in _HYDRA_FLAGS for a in argv)  # --help, --cfg
    multirun = any(a in _HYDRA_FLAGS for a in argv)
    resume, lock = None, None
    try:
        check_overrides(argv, _conf_dir())
        if not special and not multirun:
            ckpt = _ckpt_argument(argv)
            resume = CheckpointFile.read(ckpt) if ckpt else None
            stored = checkpoint_overrides(argv, task, resume.record if resume else None)
            stored, run_dir = _precheck_dropping(task, stored, argv, resume)
            argv = stored + argv
            if run_dir is not None and is_rank_zero():  # DDP ranks > 0 share rank 0's
                # The run directory is taken (locked) before Hydra writes into it, and Hydra
                # gets that one (its ${now:...} would give another).
                lock = RunDirLock(run_dir)
                lock.acquire()
                argv.append(f"hydra.run.dir={_hydra_value(str(run_dir))}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.argv[1:] = argv

    def task_function(cfg: DictConfig) -> Any:
        if in_multirun():
            return _sweep_job(run, cfg)
        with report_error():
            given = resume if resume is not None and resume.is_of(cfg.get("ckpt_path")) else None
            return run(cfg, given)

    # Hydra names the job, and so its log file (<task>.log), after the task function's module.
    task_function.__module__ = f"mpcl.{task}"
    launched_sweeps.clear()
    try:
        main = hydra.main(version_base="1.3", config_path="pkg://mpcl.conf", config_name=task)
        main(task_function)()
    finally:
        if lock is not None:
            lock.release()
    _exit_if_jobs_failed()


def _sweep_job(run: Callable[[DictConfig, CheckpointFile | None], Any], cfg: DictConfig) -> Any:
    """One job of a multirun: a failure is printed as its one line, recorded in
    ``<job dir>/job.json`` with its exit status, and the job returns (None) so that the
    launcher goes on with the next one."""
    from hydra.core.hydra_config import HydraConfig

    outcome, value = JobOutcome(), None
    out = HydraConfig.get().runtime.output_dir
    lock = RunDirLock(out) if is_rank_zero() else None
    try:
        with report_error(outcome):
            if lock is not None:
                lock.acquire()  # two sweeps into one hydra.sweep.dir: the second's job fails
            value = run(cfg, None)
        if lock is not None and lock.held:  # not into another live sweep's job directory
            outcome.write(out, value)
    finally:  # also when an interrupt ends the sweep
        if lock is not None:
            lock.release()
    return value if outcome.exit_status == 0 else None


def _exit_if_jobs_failed() -> None:
    """After a multirun: one line and ``SweepFailed``'s status if any of its jobs failed."""
    lines = [line for sweep in launched_sweeps if (line := sweep_failure_line(sweep))]
    launched_sweeps.clear()
    if lines:
        error = SweepFailed(" | ".join(lines))
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)


def _precheck_dropping(
    task: str, stored: list[str], argv: list[str], resume: CheckpointFile | None
) -> tuple[list[str], Path | None]:
    """``precheck`` of ``stored + argv``; a stored override whose key the config no longer has
    (the command line chose another group, e.g. ``prototype=none``) is dropped, with a note.
    Returns the stored overrides kept and the run directory."""
    while True:
        try:
            return stored, precheck(task, stored + argv, resume)
        except UnknownKeyError as e:
            kept = [o for o in stored if override_key(o) != e.key]
            if len(kept) == len(stored):
                raise
            echo(f"note: the checkpoint's override of {e.key} does not apply here; dropped it")
            stored = kept


def _remove_empty_run_dir() -> None:
    """Remove this job's run directory if it holds only Hydra's files (``.hydra/``, the log):
    a rejected invocation leaves nothing behind."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return
    if not out.is_dir():
        return
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if (
            path.is_dir()
            or rel.parts[0] == ".hydra"
            or (len(rel.parts) == 1 and (rel.suffix == ".log" or rel.name == LOCK_NAME))
        ):
            continue
        return  # the run produced something: keep it
    shutil.rmtree(out, ignore_errors=True)
    for parent in (out.parent, out.parent.parent):  # <task>/runs, <task>: if now empty
        try:
            parent.rmdir()
        except OSError:
            break


def _handled(e: BaseException) -> tuple[int, str] | None:
    """(exit status, the message to print) for an error a user can meet; None for a bug."""
    if isinstance(e, RunInterrupted):
        return e.exit_code, str(e)
    if isinstance(e, TrainingDiverged | SweepFailed):
        return e.exit_code, f"error: {e}"
    if isinstance(e, KeyboardInterrupt):
        return 130, "error: interrupted (nothing to save outside training)"
    cause = e
    while cause.__cause__ is not None and not isinstance(cause, OSError | ValueError):
        cause = cause.__cause__
    if not isinstance(cause, OSError | ValueError):
        return None
    text = " ".join(str(cause).split())
    return getattr(cause, "exit_code", EXIT_BAD_INPUT), f"error: {text or type(cause).__name__}"


@contextmanager
def report_error(outcome: JobOutcome | None = None) -> Iterator[None]:
    """Bad input (OSError / ValueError, possibly wrapped by Hydra's instantiate) exits with one
    line naming the problem and the fix (status 2); a divergence with one line (3); an
    interrupt with the checkpoint and the resume command (128 + signal). Anything else is a
    bug and keeps its traceback. All of it also goes into the run's log file (``run_log``).

    ``outcome``: a multirun job's; its failure is recorded there instead of ending the
    process (the traceback of a bug is printed, and the block's exception suppressed), so
    that the sweep goes on. An interrupt of a job that shares the launching process still
    ends it: Ctrl-C stops the whole sweep.
    """
    with run_log():
        try:
            yield
        except (Exception, KeyboardInterrupt) as e:
            handled = _handled(e)
            if handled is None:
                if outcome is None:
                    raise
                trace = traceback.format_exc()
                echo(trace.rstrip(), err=True)
                first = " ".join(str(e).split())[:300]
                handled = EXIT_BUG, f"error: a bug: {type(e).__name__}: {first} (traceback above)"
            else:
                echo(handled[1], err=True)
            code, message = handled
            interrupt = isinstance(e, RunInterrupted | KeyboardInterrupt)
            if outcome is not None and not (interrupt and not in_job_process()):
                outcome.fail(code, message)
                return
            if not isinstance(e, RunInterrupted | TrainingDiverged):
                _remove_empty_run_dir()
            sys.exit(code)
        finally:
            # Each multirun job must close its W&B run, or the next job logs into it.
            if "wandb" in sys.modules:
                import wandb

                if wandb.run is not None:
                    wandb.finish()
