"""How every console entry point reports an error its user caused (a file, field or id that is wrong): one line on
stderr, `<tool>: error: <message>`, and exit code 2, without a traceback. A bug keeps its traceback: only the
exception types below are caught, never Exception.

    @report_errors("nulls-eval")              # an argparse main
    def main(argv=None): ...

    @hydra.main(config_path=..., config_name=..., version_base="1.3")
    @report_errors("nulls-data", hydra=True)  # a Hydra app's task function (errors in the job) ...
    def _app(cfg): ...

    @report_errors("nulls-data", hydra=True)  # ... and the main() running it (Hydra's own config errors:
    def main(): _app()                        # an unknown override key, a missing config group option)

Why both for Hydra: an exception leaving the task function makes Hydra print "Error executing job with
overrides: [...]" before it re-raises, and Hydra's composition errors happen before the task runs, where Hydra
prints them over several lines with a hint to set HYDRA_FULL_ERROR=1 and exits 1. With `hydra=True` the
decorator sets HYDRA_FULL_ERROR=1 itself, so Hydra raises instead of printing, and turns those errors into the
one line (a bug then shows its complete traceback, as HYDRA_FULL_ERROR promises).
"""
from __future__ import annotations

import functools
import linecache
import os
import sys
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# What a user's input raises: ValueError is the house type for a bad config field, file or id (formats'
# CheckpointError, ShardError and WeightsError, json.JSONDecodeError and UnicodeDecodeError are ValueErrors);
# the OSError subclasses are a path the user named that is missing, is a file or a directory where the other was
# needed, cannot be written, or already exists. Other OSErrors (I/O errors, a full disk) are the machine's.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                                                IsADirectoryError, NotADirectoryError)
EXIT_USER_ERROR = 2  # argparse's code for bad usage


def report_errors(tool: str, *, hydra: bool = False,
                  deliberate: tuple[type[BaseException], ...] = ()) -> Callable[[F], F]:
    """Run the decorated entry point; a user error prints `error_line` on stderr and exits 2.

    `deliberate`: types caught only when a `raise` statement of nulls_dist's own code raised them -- nulls-train's
    RuntimeError for a checkpoint that does not match the run (house style). torch reports its failures (a shape
    mismatch, a CUDA error) as RuntimeError too; those are bugs and keep their traceback.
    `hydra`: the entry point is (or runs) a Hydra app: see the module docstring."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            caught = USER_ERRORS + deliberate + (_hydra_user_errors() if hydra else ())
            previous = os.environ.get("HYDRA_FULL_ERROR")
            if hydra:
                os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return fn(*args, **kwargs)
            except caught as exc:
                if isinstance(exc, deliberate) and not isinstance(exc, USER_ERRORS) and not _raised_by_us(exc):
                    raise
                print(error_line(tool, exc), file=sys.stderr, flush=True)
                sys.exit(EXIT_USER_ERROR)
            finally:
                if hydra and previous is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                elif hydra:
                    os.environ["HYDRA_FULL_ERROR"] = previous

        return wrapper  # type: ignore[return-value]

    return decorate


def error_line(tool: str, exc: BaseException) -> str:
    """`<tool>: error: <message>` on one line (a multi-line message is joined with "; ")."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        message = f"{exc.filename}: {exc.strerror}"
        if exc.filename2 is not None:
            message += f" (-> {exc.filename2})"
    else:
        message = str(exc) or type(exc).__name__
        cause = exc.__cause__
        if cause is not None and type(cause).__module__.startswith("omegaconf"):
            message += f"\n{cause}"  # Hydra keeps the offending key in the OmegaConf cause, as it prints it
        message = message.split("\nConfig search path:")[0]  # Hydra's list of config sources: not the user's
    lines = [line.strip() for line in message.splitlines() if line.strip()] or [type(exc).__name__]
    joined = lines[0]
    for line in lines[1:]:
        joined = joined + " " + line if joined.endswith(":") else joined.removesuffix(".") + "; " + line
    return f"{tool}: error: {joined}"


def _hydra_user_errors() -> tuple[type[BaseException], ...]:
    """Hydra's compact errors (bad override syntax or key, a config group option that does not exist: what Hydra
    itself prints without a traceback) and a mandatory value (`???`) left unset."""
    from hydra.errors import CompactHydraException
    from omegaconf.errors import MissingMandatoryValue

    return CompactHydraException, MissingMandatoryValue


def _raised_by_us(exc: BaseException) -> bool:
    """True when the innermost frame of `exc`'s traceback is a `raise` statement in a nulls_dist module."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    if not tb.tb_frame.f_globals.get("__name__", "").startswith("nulls_dist."):
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise")


def keep_stdout_for_output() -> None:
    """For tools whose stdout is their JSON: DeepSpeed, if anything imports it, logs through its own `DeepSpeed`
    logger, whose handler writes to stdout (propagation off), and warns "Setting accelerator to CPU" when it has to
    detect the accelerator. These tools run on the CPU: say so (unless the user did), and it has nothing to say."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
