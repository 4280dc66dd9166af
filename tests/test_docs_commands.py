"""Every ``sslcli`` command shown in README.md and docs/ parses against the real CLI.

Docs rot first where an option is renamed or a recipe variant removed; this catches both without running
anything: each command goes through click's own parser (unknown options, missing arguments, bad values and
choices fail as they would for a user), and each ``pretrain`` resolves its method, recipe and ``--set``
keys through ``build_config``, as the command does before it reads any data.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from sslcli.cli.app import app
from sslcli.config import build_config

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.S)
# `sslcli ARGS` at the start of a line, after `&&` / `;`, or as `python -m sslcli ARGS`.
INVOCATION = re.compile(r"(?:^|&&\s*|;\s*|\s-m\s)sslcli\s+(.*)")
# Where the command's own arguments end: a trailing comment, a pipe, a redirect or another command.
END = re.compile(r"\s+#\s|\s*(?:&&|\|\||;|\||2?>|&$)")


def doc_commands(path: Path) -> list[list[str]]:
    """The argv (after ``sslcli``) of each command in the file's shell code blocks."""
    commands = []
    for block in FENCE.findall(path.read_text()):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip().removeprefix("$ ")
            match = None if line.startswith("#") else INVOCATION.search(line)
            if match:
                commands.append(shlex.split(END.split(match.group(1))[0]))
    return commands


def parse(argv: list[str]) -> Any:
    """The innermost command's click context, parsed as ``sslcli ARGV`` would be; raises click's usage errors.

    Duck-typed: recent typer vendors its own click, so ``click.Group`` is not the class to test against.
    """
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("sslcli", list(argv))
    while hasattr(command, "resolve_command"):  # a group: descend into the named subcommand
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return ctx
        name, command, rest = *command.resolve_command(ctx, rest)[:2], rest[1:]
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def check(argv: list[str]) -> None:
    try:
        ctx = parse(argv)
    except typer.Exit:  # --help
        return
    if ctx.info_name == "pretrain":
        recipe = ctx.params["recipe"]
        if recipe is not None and recipe.endswith((".yaml", ".yml")) and not Path(recipe).exists():
            recipe = None  # a user's own file in the example; the method and --set keys are still checked
        build_config(ctx.params["method"], recipe, sets=ctx.params["set_"])


def test_the_docs_show_commands_to_check() -> None:
    found = {path.relative_to(ROOT).as_posix(): len(doc_commands(path)) for path in DOCS}
    assert sum(found.values()) >= 100, found
    for page in ("README.md", "docs/getting-started.md", "docs/commands/pretrain.md", "docs/commands/knn.md"):
        assert found[page] > 0, page


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_documented_command_parses(path: Path) -> None:
    failures = []
    for argv in doc_commands(path):
        try:
            check(argv)
        except Exception as error:  # noqa: BLE001 - every failure is reported, not just the first
            failures.append(f"sslcli {shlex.join(argv)}\n    -> {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("argv, problem", [
    (["knn", "runs/x", "--data", "d", "--neighbours", "5"], "No such option"),
    (["pretrain", "simclr", "--recipe", "tiny"], "unknown recipe"),
    (["pretrain", "simclr", "--set", "optim.momentm=0.9"], "momentm"),
    (["pretrian", "simclr"], "No such command"),
])
def test_a_stale_command_fails_the_check(argv: list[str], problem: str) -> None:
    with pytest.raises(Exception, match=problem):
        check(argv)
