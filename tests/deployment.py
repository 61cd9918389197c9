"""What the compose and Kubernetes checks share: compose's `${VAR...}` interpolation (so that a
file is checked as `docker compose` would run it, and a missing secret is seen to stop it), the
`EMBEDQ_*` variables the code reads, and the `embedq` CLI's commands and options."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

import typer

from common.launch.cli import app
from common.settings import Settings

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", re.DOTALL)


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset: compose stops with the message."""

    def __init__(self, name: str, message: str):
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name = name


def _closing(text: str, start: int) -> int:
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unclosed ${{ in {text!r}")


def _expand(expr: str, env: Mapping[str, str]) -> str:
    match = BRACED.fullmatch(expr)
    if not match:
        raise ValueError(f"not a compose variable: ${{{expr}}}")
    name, op, arg = match.groups()
    value = env.get(name)
    if op is None:
        return value or ""
    present = bool(value) if op.startswith(":") else value is not None
    kind = op[-1]
    if kind == "-":
        return value if present else interpolate(arg, env)
    if kind == "+":
        return interpolate(arg, env) if present else ""
    if not present:
        raise MissingVariable(name, interpolate(arg, env))
    return value


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` with compose's variable syntax resolved against `env`: `$$`, `$VAR`, `${VAR}`,
    `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, nested."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing(text, i + 2)
            out.append(_expand(text[i + 2 : end], env))
            i = end + 1
        elif name := NAME.match(text, i + 1):
            out.append(env.get(name.group(), ""))
            i = name.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def interpolated(doc: Any, env: Mapping[str, str]) -> Any:
    """A parsed compose file with every string value interpolated (keys are not, as in compose)."""
    if isinstance(doc, dict):
        return {key: interpolated(value, env) for key, value in doc.items()}
    if isinstance(doc, list):
        return [interpolated(value, env) for value in doc]
    return interpolate(doc, env) if isinstance(doc, str) else doc


def setting_variables() -> set[str]:
    """The `EMBEDQ_*` variables common/settings.py reads."""
    return {f"{Settings.model_config['env_prefix']}{name}".upper() for name in Settings.model_fields}


@cache
def cli_options() -> dict[str, set[str]]:
    """`embedq` subcommand -> the options it takes."""
    group = typer.main.get_command(app)
    return {
        name: {opt for param in command.params for opt in param.opts if opt.startswith("-")}
        for name, command in group.commands.items()
    }


def check_embedq_argv(argv: list[str]) -> str:
    """Assert that `argv` is a real `embedq` command line; return its subcommand."""
    assert argv[0] == "embedq" and len(argv) > 1, argv
    options = cli_options()
    assert argv[1] in options, f"{argv}: no `embedq {argv[1]}`"
    for part in argv[2:]:
        if part.startswith("-"):
            assert part.split("=", 1)[0] in options[argv[1]], f"{argv}: `embedq {argv[1]}` has no {part}"
    return argv[1]


def memory_bytes(quantity: str | int) -> int:
    """A memory size in binary units as compose and Redis (`512m`, `1536mb`) or Kubernetes
    (`512Mi`, `2Gi`) write them; Kubernetes' decimal `G` is refused, so as not to be misread."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(b|i)?", str(quantity), re.IGNORECASE)
    assert match and not (match.group(2).isupper() and match.group(3) is None), f"not binary units: {quantity}"
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)
