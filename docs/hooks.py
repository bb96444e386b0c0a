"""MkDocs hook: the parts of the pages that the code already says, generated at build time so
that nothing is written twice (``hooks: [docs/hooks.py]`` in mkdocs.yml).

A page asks for a part with a line of its own:

    <!-- clusiam:options COMMAND -->   the options of COMMAND (a key of COMMANDS), from its parser
    <!-- clusiam:errors -->            every user error: its types and each message the code raises
    <!-- clusiam:results -->           benchmarks/RESULTS.md, one heading level down

The API page's docstrings keep their Sphinx roles (:class:`X`) out of sight. tests/test_docs.py
builds the site with ``--strict`` and checks these parts against the code.
"""
from __future__ import annotations

import argparse
import ast
import html
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mkdocs.exceptions import PluginError

from clusiam import config, demo, errors, export, knn_eval, reproduce, slidemap, tile
from mil import compute_feats, train

ROOT = Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc):<code>(~?)([\w.]+)</code>")  # in HTML
MARKER = re.compile(r"^<!-- clusiam:(\w+)(?: (\S+))? -->[ \t]*$", re.MULTILINE)

# Every command, by the name a marker gives, and the function that builds its parser.
COMMANDS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "pretrain.py": config.build_parser,
    "evaluate_knn.py": knn_eval.build_parser,
    "clusiam.tile": tile.build_parser,
    "clusiam.export": export.build_parser,
    "clusiam.slidemap": slidemap.build_parser,
    "clusiam.reproduce": reproduce.build_parser,
    "clusiam.demo": demo.build_parser,
    "mil.compute_feats": compute_feats.build_parser,
    "mil.train": train.build_parser,
}


def on_page_markdown(markdown: str, **_: object) -> str:
    """Replace each marker line of a page with the part it names."""
    return MARKER.sub(lambda marker: render(marker[1], marker[2]), markdown)


def on_page_content(html_text: str, **_: object) -> str:
    """The docstrings' Sphinx roles (:class:`~clusiam.sources.PatchSource`) as the code alone,
    ``PatchSource``, on the API page, as Sphinx would show them."""
    return ROLE.sub(lambda role: f"<code>{role[2].rsplit('.', 1)[-1] if role[1] else role[2]}</code>", html_text)


def render(part: str, argument: str | None) -> str:
    if part == "options" and argument in COMMANDS:
        return render_options(argument)
    if part == "errors" and argument is None:
        return render_errors()
    if part == "results" and argument is None:
        return render_results()
    raise PluginError(f"unknown marker clusiam:{part} {argument or ''}: use options COMMAND (one of "
                      f"{', '.join(COMMANDS)}), errors or results")


def invocation(command: str) -> str:
    """How a user runs the command: ``pretrain.py`` or ``python -m clusiam.tile``."""
    return command if command.endswith(".py") else f"python -m {command}"


def text(markdown: str) -> str:
    """Prose from the code made safe for a table cell: HTML and Markdown's own characters
    escaped outside code spans, so ``<slide>.h5`` or ``lr * batch_size`` read as written."""
    parts = re.split(r"(`+[^`]*`+)", markdown.replace("\n", " "))
    return "".join(part if index % 2 else re.sub(r"([\\*_\[\]|])", r"\\\1", html.escape(part, quote=False))
                   for index, part in enumerate(parts))


def code(value: str) -> str:
    """``value`` as inline code, also when it holds a backtick itself."""
    return f"`` {value} ``" if "`" in value else f"`{value}`"


# ---- options -------------------------------------------------------------------------------------

def render_options(command: str) -> str:
    """The command's description, then a table of its options for each of its argument groups."""
    parser = COMMANDS[command]()
    lines = [f"## `{invocation(command)}`", "", *paragraph(parser.description)]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions
                   if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)]
        if actions:
            lines += [f"### {group.title}", "", *paragraph(group.description),
                      "| option | default | type or choices | what it does |", "|---|---|---|---|"]
            lines += ["| " + " | ".join(option_cells(parser, action)) + " |" for action in actions] + [""]
    return "\n".join(lines)


def paragraph(prose: str | None) -> list[str]:
    return [text(prose), ""] if prose else []


def option_cells(parser: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    names = action.option_strings or [action.metavar or action.dest]
    return [", ".join(code(name) for name in names), default(action), kind(action), text(help_text(parser, action))]


def default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse.BooleanOptionalAction):
        return {True: "on", False: "off"}.get(action.default, "—")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"  # the switch is not given
    if action.default is None:
        return "—"
    value = action.default
    return code(" ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))


def kind(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on / off"
    if action.nargs == 0:
        return "switch"
    if action.choices is not None:
        values = "one of " + ", ".join(code(str(choice)) for choice in action.choices)
    else:  # a type function by its name: positive_minutes -> "positive minutes"
        values = {None: "text", str: "text", int: "integer", float: "number", Path: "path"}.get(
            action.type, getattr(action.type, "__name__", "text").replace("_", " "))
    counts = {"+": "one or more", "*": "any number", "?": "optional"}
    count = counts.get(action.nargs, f"{action.nargs} values" if isinstance(action.nargs, int) else None)
    return text(f"{values} ({count})" if count else values)


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help as ``--help`` shows it, with its ``%(choices)s``-style fields filled in."""
    if not action.help or "%" not in action.help:
        return action.help or ""
    fields = dict(vars(action), prog=parser.prog)
    if action.choices is not None:
        fields["choices"] = ", ".join(map(str, action.choices))
    return action.help % fields


# ---- errors --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Raise:
    """One ``raise SomeError(message)`` in the code."""

    error: str
    module: str  # its file, relative to the repository root
    line: int
    template: str  # the message, with what only the run knows as {expression}


def error_types() -> list[type[errors.UserError]]:
    """The user errors of clusiam/errors.py, in the order they are defined there."""
    return [value for value in vars(errors).values() if isinstance(value, type)
            and issubclass(value, errors.UserError) and value.__module__ == errors.__name__]


def raised(names: set[str]) -> list[Raise]:
    """Every place the code raises one of the error types ``names``, in file and line order."""
    sites = []
    for path in sorted(path for package in ("clusiam", "mil") for path in (ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and called(node.exc) in names:
                message = template(node.exc.args[0], constants) if node.exc.args else "(no message)"
                message = message.replace("\n", "\\n")  # printed on one line, as errors.run_command does
                sites.append(Raise(called(node.exc), path.relative_to(ROOT).as_posix(), node.lineno, message))
    return sorted(sites, key=lambda site: (site.module, site.line))


def called(call: ast.Call) -> str:
    function = call.func
    return function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")


def template(node: ast.expr, constants: dict[str, str]) -> str:
    """The message an expression builds (a string, an f-string, strings added up), with what
    only the run knows as a placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(template(part, constants) for part in node.values)
    if isinstance(node, ast.FormattedValue):  # one placeholder, whatever its expression adds up
        return placeholder(node.value, constants)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return template(node.left, constants) + template(node.right, constants)
    return placeholder(node, constants)


def placeholder(node: ast.expr, constants: dict[str, str]) -> str:
    """``{expression}``, as the code computes it; but a module constant of text (also as in
    ``ADVICE.format(backbone=...)``) is its text, whose own ``{fields}`` stay as they are."""
    is_format = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
    named = node.func.value if is_format else node
    if isinstance(named, ast.Name) and named.id in constants:
        return constants[named.id]
    return "{" + ast.unparse(node) + "}"


def commands_of_files() -> dict[str, list[str]]:
    """For each source file, the commands that import it, directly or through other files."""
    users: dict[str, list[str]] = {}
    for command in COMMANDS:
        seen, todo = set(), [ROOT / command if command.endswith(".py") else module_file(command)]
        while todo:
            path = todo.pop()
            if path not in seen:
                seen.add(path)
                todo += imported_files(path)
        for path in seen:
            users.setdefault(path.relative_to(ROOT).as_posix(), []).append(command)
    return users


def imported_files(path: Path) -> list[Path]:
    """The repository's own files that ``path`` imports (at the top or inside a function)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    files = [module_file(name) for name in names] + [module_file(f"{name}.__init__") for name in names]
    return [file for file in files if file.is_file()]


def module_file(name: str) -> Path:
    return ROOT.joinpath(*name.split(".")).with_suffix(".py")


def render_errors() -> str:
    """Each error type with its docstring, then per module the messages it raises it with."""
    types = error_types()
    sites = raised({error.__name__ for error in types})
    users = commands_of_files()
    lines = []
    for error in types:
        base = "" if error is errors.UserError else f" (a `{errors.UserError.__name__}`)"
        lines += [f"## `{error.__name__}`", "", text(error.__doc__ or "") + base, ""]
        for module in dict.fromkeys(site.module for site in sites if site.error == error.__name__):
            lines += [f"### `{module}`", "", f"Loaded by {loaded_by(users.get(module, []))}.", ""]
            lines += [f"- {code(site.template)} (line {site.line})"
                      for site in sites if site.error == error.__name__ and site.module == module] + [""]
    return "\n".join(lines)


def loaded_by(commands: list[str]) -> str:
    """The commands in words, the shorter way round: ``every command but python -m clusiam.demo``."""
    others = [command for command in COMMANDS if command not in commands]
    if len(others) >= len(commands):
        return ", ".join(code(invocation(command)) for command in commands) or "no command"
    return "every command" + "".join(f"{', ' if index else ' but '}{code(invocation(command))}"
                                     for index, command in enumerate(others))


# ---- benchmark results ---------------------------------------------------------------------------

LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)[^)]*\)")


def render_results() -> str:
    """benchmarks/RESULTS.md inside a page: its headings one level down, and its links to files
    of the repository (which the site does not hold) turned into the path as code."""
    lines, fenced = [], False
    for line in (ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines():
        fenced ^= line.startswith("```")
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    return LINK.sub(repository_link, "\n".join(lines))


def repository_link(link: re.Match) -> str:
    _, label, target = link.groups()
    if re.match(r"[a-z]+:|#", target):  # a web address or an anchor of the same text
        return link[0]
    path = code(os.path.normpath(os.path.join("benchmarks", target)))
    return f"{label} ({path})" if label else path
