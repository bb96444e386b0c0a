"""The documentation site: it builds under ``mkdocs build --strict`` (no broken link, anchor or
page), its generated parts say what the code says, and every flag the README or a page names
exists in the command it is given to."""
from __future__ import annotations

import argparse
import ast
import html
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mkdocs.exceptions import PluginError

from clusiam import errors

REPO = Path(__file__).resolve().parents[1]


def load_hooks():
    """docs/hooks.py, loaded as mkdocs loads it (it is no package of ours)."""
    spec = importlib.util.spec_from_file_location("clusiam_docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The strict build (its result and output) and the folder it wrote, which holds every page
    even when --strict refused the build for a warning."""
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    return build, out


def page(site_dir: Path, name: str) -> str:
    return (site_dir / name / "index.html").read_text()


def heading_texts(page_html: str, level: int) -> list[str]:
    """The text of a page's headings of one level, without the permalink mark."""
    found = re.findall(rf"<h{level}\b[^>]*>(.*?)</h{level}>", page_html, re.DOTALL)
    return [html.unescape(re.sub(r"<a class=\"headerlink\".*?</a>|<[^>]+>", "", text)).strip() for text in found]


def test_the_site_builds_under_strict(site):
    build, _ = site
    assert build.returncode == 0, build.stdout + build.stderr


def test_the_options_page_lists_every_option_of_every_command(site):
    sections = re.split(r"(?=<h2 )", page(site[1], "reference"))
    for command, build_parser in hooks.COMMANDS.items():
        parser = build_parser()
        assert parser.prog == hooks.invocation(command)  # the page's heading is how it is run
        section = next(part for part in sections if heading_texts(part, 2) == [parser.prog])
        shown = {html.unescape(text) for text in re.findall(r"<code>([^<]*)</code>", section)}
        options = {name for action in parser._actions if not isinstance(action, argparse._HelpAction)
                   for name in action.option_strings or [action.metavar or action.dest]}
        assert options <= shown, f"{command}: {sorted(options - shown)} missing from the options page"


def shown_default(action: argparse.Action) -> str:
    """A default as ``--help`` writes it: a list's values side by side."""
    value = action.default
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


@pytest.mark.parametrize("command", list(hooks.COMMANDS))
def test_help_shows_every_options_default_once_and_never_none(command):
    """Every option with a default other than None shows it in ``--help``, once, unless it is a
    switch (off unless given); an option left unset says in words what that means, not None."""
    parser = hooks.COMMANDS[command]()
    assert "(default: None)" not in parser.format_help()
    formatter = parser._get_formatter()  # each option's part of format_help(), as it prints it
    for action in parser._actions:
        shown = " ".join(formatter._format_action(action).split())
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if action.default is None or action.default == argparse.SUPPRESS or switch:
            continue
        assert shown.count("(default: ") == 1 and f"(default: {shown_default(action)})" in shown, (command, shown)


def test_the_troubleshooting_page_lists_every_error_type_and_raise(site):
    troubleshooting = page(site[1], "troubleshooting")
    types = [error.__name__ for error in hooks.error_types()]
    assert heading_texts(troubleshooting, 2) == types
    assert {"ConfigError", "DataError", "CheckpointError", "NonFiniteLossError"} <= set(types)
    sites = hooks.raised(set(types))
    assert len(sites) > 100 and troubleshooting.count("<li><code>") == len(sites)


@pytest.mark.parametrize("config", ["no_such_file.yaml", "a list.yaml", "tabs.yaml"])
def test_a_raised_message_matches_its_template(tmp_path, config):
    """The templates are the messages: a real refusal matches one of config.py's, the parts
    the run fills in standing for any text."""
    from clusiam.config import parse_config

    (tmp_path / "a list.yaml").write_text("- epochs\n- 3\n")
    (tmp_path / "tabs.yaml").write_text("epochs: 3\n\tlr: 0.1\n")
    with pytest.raises(errors.ConfigError) as refusal:
        parse_config(["--config", str(tmp_path / config)])
    templates = [site.template for site in hooks.raised({"ConfigError"}) if site.module == "clusiam/config.py"]
    patterns = [".*".join(map(re.escape, re.split(r"\{[^{}]*\}", template))) for template in templates]
    assert any(re.fullmatch(pattern, str(refusal.value)) for pattern in patterns), str(refusal.value)


def test_a_user_error_is_one_line_and_status_2_as_the_page_says(capsys):
    def refuse() -> None:
        raise errors.DataError("patches/a.png is empty:\nremove it")

    assert errors.run_command(refuse) == 2
    assert capsys.readouterr().out == "error: patches/a.png is empty:\\nremove it\n"
    intro = " ".join((REPO / "docs" / "troubleshooting.md").read_text().split())
    assert "one line, `error: MESSAGE`, and exit status 2" in intro


def test_the_speed_page_holds_the_results_with_their_headings_one_level_down(site):
    speed = page(site[1], "speed")
    results = (REPO / "benchmarks" / "RESULTS.md").read_text()
    for hashes, title in re.findall(r"^(#+) (.+)$", results, re.MULTILINE):
        assert title.replace("`", "") in heading_texts(speed, len(hashes) + 1), title
    rows = [line for line in results.splitlines() if line.startswith("|") and not re.fullmatch(r"[|:\- ]+", line)]
    assert speed.count("<tr>") == len(rows)  # every table row, the header rows included


def test_a_page_part_is_rendered_where_its_marker_stands_and_an_unknown_one_fails_the_build():
    page_text = "# Demo\n\n<!-- clusiam:options clusiam.demo -->\n\nAfter.\n"
    rendered = hooks.on_page_markdown(page_text)
    assert rendered.startswith("# Demo\n\n## `python -m clusiam.demo`") and rendered.endswith("\nAfter.\n")
    assert "| `--no_cmu` | off | switch | synthetic slides only |" in rendered
    with pytest.raises(PluginError, match="clusiam:options pretrain"):
        hooks.on_page_markdown("<!-- clusiam:options pretrain -->")


def test_links_of_the_results_to_repository_files_become_paths_and_roles_become_code():
    links = "[the script](knn.py), ![plot](../docs/a.png), [eva](https://kaiko-ai.github.io/eva/), [up](#knn)"
    assert hooks.LINK.sub(hooks.repository_link, links) == (
        "the script (`benchmarks/knn.py`), plot (`docs/a.png`), [eva](https://kaiko-ai.github.io/eva/), [up](#knn)")
    roles = "a :class:<code>~clusiam.sources.PatchSource</code> of :mod:<code>clusiam.knn</code>"
    assert hooks.on_page_content(roles) == "a <code>PatchSource</code> of <code>clusiam.knn</code>"


# ---- the flags the README and the pages name --------------------------------------------------

# Flags of other tools that the text names in prose, by tool. In a code line the tool's own name
# says whose flags follow (torchrun's before pretrain.py, pip's after pip), so they need no entry.
FOREIGN_FLAGS = {
    "torchrun": {"--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_endpoint", "--rdzv_backend", "--rdzv_id",
                 "--max_restarts", "--standalone"},
    "CLAM's create_patches_fp.py / extract_features_fp.py": {"--data_h5_dir", "--data_slide_dir", "--csv_path",
                                                             "--feat_dir", "--slide_ext", "--source", "--seg"},
    "TRIDENT's run_batch_of_slides.py": {"--task", "--wsi_dir", "--job_dir", "--patch_encoder", "--mag"},
    "tensorboard": {"--logdir"},
    "pip": {"--upgrade", "--index-url", "--extra-index-url", "--editable"},
    "pytest": {"--lf", "--durations", "--basetemp"},
    "sbatch / srun": {"--array", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--gres", "--cpus-per-task",
                      "--time", "--partition", "--dependency", "--signal", "--requeue", "--export"},
}
FOREIGN_TOOLS = {"pip", "pip3", "pytest", "ruff", "tensorboard", "eva", "sbatch", "srun", "squeue", "scancel",
                 "sacct", "git", "mkdocs", "conda", "docker", "apptainer", "singularity", "huggingface-cli", "hf"}
FLAG = re.compile(r"(?<![\w/.-])--[A-Za-z][\w-]*")
PROGRAM = re.compile(r"(?:^|(?<=\s))(?:-m\s+(?P<module>[\w.]+)|(?P<script>[\w./-]*\.py))(?=\s|$)")


def command_flags() -> dict[str, set[str]]:
    """Every option string of every command: ours, and our benchmark scripts'."""
    flags = {command: {name for action in build()._actions for name in action.option_strings}
             for command, build in hooks.COMMANDS.items()}
    for script in (REPO / "benchmarks").glob("*.py"):
        calls = [node for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.Call)
                 and getattr(node.func, "attr", None) == "add_argument" and node.args]
        flags[f"benchmarks/{script.name}"] = {call.args[0].value for call in calls
                                              if isinstance(call.args[0], ast.Constant)} | {"-h", "--help"}
    return flags


FLAGS = command_flags()
KNOWN_ANYWHERE = set().union(*FLAGS.values(), *FOREIGN_FLAGS.values())


def code_lines(text: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, line, whether it is code) for a Markdown text: fenced blocks and indented
    blocks are code (a backslash continues a command onto the next line; a line holding inline
    code is prose, as in an indented list paragraph); ``#SBATCH`` lines are sbatch's and left out."""
    fenced, previous_code, previous, pending = False, False, "", None
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced, previous_code, previous = not fenced, False, line
            continue
        is_code = fenced or (line.startswith("    ") and (previous_code or not previous.strip()) and "`" not in line)
        previous = line
        previous_code = is_code
        if not is_code:
            yield number, line, False
        elif pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        else:
            pending = (number, line.strip())
        if pending is not None and not line.rstrip().endswith("\\"):
            if not pending[1].startswith("#SBATCH"):
                yield pending[0], pending[1].replace("\\ ", " "), True
            pending = None


def whose(segment: str) -> tuple[str | None, int]:
    """The command a shell segment runs (None for another tool's, "" when it runs none that is
    known) and where its own arguments start."""
    for program in PROGRAM.finditer(segment):
        module, script = program["module"], program["script"]
        if module and module.split(".")[0] in ("clusiam", "mil"):
            return module, program.end()  # one that is not a command is reported as such
        if script and script.startswith("benchmarks/"):
            return script, program.end()
        if script and Path(script).name in ("pretrain.py", "evaluate_knn.py"):
            return Path(script).name, program.end()
    words = [word for word in segment.split() if not re.fullmatch(r"\w+=\S*", word)]
    return (None if words and (words[0] in FOREIGN_TOOLS or re.fullmatch(r"python3?", words[0])) else ""), 0


def slips_in_command(segment: str) -> list[str]:
    """The flags a command line gives that its command does not have."""
    command, start = whose(segment)
    if command is None:
        return []
    if not command:
        return slips_in_prose(segment)
    if command not in FLAGS:
        return [f"{command} (no such command)"]
    own, _, extra = segment[start:].partition(" -- ")
    # clusiam.reproduce and the benchmark scripts hand what follows a -- on to pretrain.py
    passed_on = "pretrain.py" if command == "clusiam.reproduce" or command.startswith("benchmarks/") else command
    return ([f"{flag} ({command})" for flag in FLAG.findall(own) if flag not in FLAGS[command]]
            + [f"{flag} ({passed_on}, after --)" for flag in FLAG.findall(extra) if flag not in FLAGS[passed_on]])


def slips_in_prose(line: str) -> list[str]:
    """The flags a prose line names that no command has and no other tool is known for; an inline
    code span that runs a command is held to that command."""
    slips = []
    for index, part in enumerate(re.split(r"(`+[^`]*`+)", line)):
        if index % 2:  # inline code: a command line of its own
            slips += slips_in_command(part.strip("` "))
        else:
            slips += [f"{flag} (no command has it)" for flag in FLAG.findall(part) if flag not in KNOWN_ANYWHERE]
    return slips


def flag_slips(text: str, name: str) -> list[str]:
    """Every flag of ``text`` (a Markdown file called ``name``) that does not exist where it is given."""
    slips = []
    for number, line, is_code in code_lines(text):
        if is_code:
            command_line = re.sub(r"(^|\s)#.*", "", line)  # a comment is prose
            found = [slip for segment in re.split(r"&&|\|\||;|\|", command_line) for slip in slips_in_command(segment)]
            found += slips_in_prose(line[len(command_line):])
        else:
            found = slips_in_prose(line)
        slips += [f"{name}:{number}: {slip}" for slip in found]
    return slips


def test_every_flag_the_readme_and_the_pages_name_exists_in_its_command():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    slips = [slip for path in pages for slip in flag_slips(path.read_text(), str(path.relative_to(REPO)))]
    assert not slips, "flags that do not exist where they are given:\n" + "\n".join(slips)


@pytest.mark.parametrize("text, slips", [
    ("    python pretrain.py --epochs 3 --no-vflip --lr=0.1", []),
    ("    torchrun --nproc_per_node 8 pretrain.py --epoch 3", ["--epoch (pretrain.py)"]),
    ("    python -m clusiam.tile SLIDES --out JOB \\\n        --checkpoint X", ["--checkpoint (clusiam.tile)"]),
    ("    python -m clusiam.reproduce --out R -- --num_worker 16 --seeds 1", ["--seeds (pretrain.py, after --)"]),
    ("    pip install -e . --no-build-isolation && python evaluate_knn.py --kk 1", ["--kk (evaluate_knn.py)"]),
    ("Pass `--probe_every` (CLAM's `--csv_path`), or `--probe_evry`.", ["--probe_evry (no command has it)"]),
    ("Run `python -m mil.train ... --probe_every 2`.", ["--probe_every (mil.train)"]),
    ("```bash\n#SBATCH --gres=gpu:8\nsrun --ntasks 1 python -m clusiam.demo OUT --grid 4\n```", []),
    ("    python -m clusiam.tiles SLIDES --out JOB   # then --jobb JOB", ["clusiam.tiles (no such command)",
                                                                     "--jobb (no command has it)"]),
    ("    python benchmarks/pipeline_loss.py --seeds 0 -- --epoch 3", ["--epoch (pretrain.py, after --)"]),
])
def test_the_flag_check_reads_commands_as_the_shell_does(text, slips):
    assert [slip.split(": ", 1)[1] for slip in flag_slips("\n" + text + "\n", "page.md")] == slips
