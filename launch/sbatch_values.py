"""What a user value may be to go into a generated batch script: the checks every `#SBATCH` value passes (our
sbatch script and the one submitit writes for sweeps), and the check on exported variable names. Values on
shell command lines are not checked here: they go through `shlex.quote`.

Why refuse rather than quote in `#SBATCH` lines: sbatch reads them with its own tokenizer (src/sbatch/opt.c,
`_get_argument`), not the shell's -- whitespace ends an argument, quotes and backslashes are consumed, an
unquoted `#` ends the line -- and slurmctld takes any `#SBATCH` line containing "hetjob" or "packjob" for the
separator of a heterogeneous job. To bash the same line is a comment until a newline, after which the rest of
the value is a command. No quoting means the same to both readers, so such values are refused, naming the field.
"""
from __future__ import annotations

import re

_REFUSED = frozenset(" '\"\\#")
_HETJOB_WORDS = ("hetjob", "packjob")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _describe(char: str) -> str:
    names = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", " ": "a space", "#": "'#'"}
    return names.get(char, f"the character {char!r}")


def _problem(text: str) -> str | None:
    """Why `text` cannot be one `#SBATCH` argument, or None."""
    for char in text:
        if not char.isprintable() or char in _REFUSED:
            return (f"it contains {_describe(char)} (control characters, whitespace, quotes, backslashes and '#' "
                    "are refused)")
    for word in _HETJOB_WORDS:
        if word in text.lower():
            return f"it contains {word!r}, which SLURM reads as the separator of a heterogeneous job"
    return None


def sbatch_safe(text: str) -> bool:
    return bool(text) and _problem(text) is None


def sbatch_value(field: str, value: object) -> str:
    """`value` as text for an `#SBATCH --opt=<value>` line; ValueError naming `field` if sbatch or bash would
    read it otherwise."""
    text = str(value)
    if not text:
        raise ValueError(f"{field} is empty; leave it unset (null) instead")
    problem = _problem(text)
    if problem is not None:
        raise ValueError(f"{field}={text!r} cannot go into an #SBATCH line: {problem}")
    return text


def sbatch_path(field: str, value: object) -> str:
    """A directory for `--output`/`--chdir`: an `#SBATCH` value without `%`, which sbatch and srun expand in
    log file names (`%j`, `%t`, ...)."""
    text = sbatch_value(field, value)
    if "%" in text:
        raise ValueError(f"{field}={text!r} cannot contain '%': sbatch and srun expand %-patterns in log paths")
    return text


def shell_name(field: str, name: object) -> str:
    """A variable name for `export NAME=...`: letters, digits and `_`, not starting with a digit."""
    text = str(name)
    if not _SHELL_NAME.fullmatch(text):
        raise ValueError(f"{field} has the key {text!r}, which is not a shell variable name "
                         "(letters, digits and '_', not starting with a digit)")
    return text
