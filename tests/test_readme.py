"""Every command the README and docs/ show runs as written: commands in their bash blocks
and in their inline code are dry-run here (the configuration a ``./run.sh`` command
composes, the ``--help`` of a Python entry point, the test files and scripts a command
names exist), the README's dataset example is a valid preset, and the README's one-cell
example and E-step sweep run into one folder and write a report. Commands that need a GPU
or data the user brings are composed all the same (their paths are not read when
composing)."""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from app.launchers import register_ray_launcher_config
from benchmark.config import DatasetConfig, to_cell
from tests.conftest import REPO_ROOT, tiny_overrides, write_tiny_dataset

README = (REPO_ROOT / "README.md").read_text()
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [README] + [page.read_text() for page in DOCS]
INLINE = re.compile(r"`((?:L2D_JAX=cuda )?\./run\.sh[^`]*|\.venv/bin/[^`]*)`")
PLACEHOLDER = re.compile(r"\.\.\.|<[^>]+>|\bPATH\b")  # written for the reader to fill in


def page_commands(text: str) -> list[str]:
    """Every command of a bash block (one per line, comments cut) and of inline code."""
    commands = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [line.split("#")[0].strip() for line in body.splitlines() if line.strip()]
    commands += [" ".join(m.group(1).split()) for m in INLINE.finditer(text)]
    return list(dict.fromkeys(c for c in commands if c))


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """The overrides of the sweep's first job (``a=1,2`` -> ``a=1``)."""
    first = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            first.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            first.append(override.input_line)
    return first


README_COMMANDS = page_commands(README)
COMMANDS = list(dict.fromkeys(c for page in PAGES for c in page_commands(page)))


def dataset_example() -> str:
    (example,) = [body for body in re.findall(r"```yaml\n(.*?)```", README, re.S)
                  if "ground_truth:" in body]
    return example


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory):
    """conf/ plus the README's own dataset example as conf/dataset/mydata.yaml, as the
    README tells the reader to write it."""
    conf = tmp_path_factory.mktemp("conf")
    shutil.copytree(REPO_ROOT / "conf", conf, dirs_exist_ok=True)
    (conf / "dataset" / "mydata.yaml").write_text(dataset_example())
    return conf


def test_the_readme_shows_commands():
    assert "./run.sh" in README_COMMANDS and "./run.sh test" in README_COMMANDS
    assert len(README_COMMANDS) > 20


def heading_anchors(text: str) -> set[str]:
    """The anchors a Markdown renderer gives the headings of ``text`` (GitHub's rule)."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_readme_links_to_every_doc_and_every_link_resolves():
    linked = set(re.findall(r"\]\((docs/[^)#]+)", README))
    assert linked >= {f"docs/{page.name}" for page in DOCS}
    for page in [REPO_ROOT / "README.md", *DOCS]:
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", page.read_text()):
            path = page.parent / target if target else page
            assert path.exists(), f"{page.name} links to missing {target}"
            if anchor:
                assert anchor in heading_anchors(path.read_text()), f"{page.name}: {target}#{anchor}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("./run.sh test ")])
def test_a_test_command_names_existing_tests(command):
    """``./run.sh test [paths] [-k name]``: every path exists, and a ``-k`` name is a test
    function in them."""
    words = shlex.split(command)[2:]
    paths = [w for w in words if not w.startswith("-") and "/" in w]
    assert all((REPO_ROOT / p).exists() for p in paths), command
    if "-k" in words:
        name = words[words.index("-k") + 1]
        files = [f for p in paths for f in ([REPO_ROOT / p] if p.endswith(".py")
                                            else (REPO_ROOT / p).rglob("test_*.py"))]
        assert any(re.search(rf"def test_\w*{name}", f.read_text()) for f in files), command


SCRIPTS = sorted({s for page in PAGES
                  for s in re.findall(r"(?:python|bash) (tests/[\w/.-]+\.(?:py|sh))", page)})


def test_the_scripts_the_pages_run_exist():
    assert SCRIPTS and [s for s in SCRIPTS if not (REPO_ROOT / s).is_file()] == []


@pytest.mark.parametrize("command", [c for c in COMMANDS if " ./run.sh" in f" {c}"
                                     and not c.startswith("./run.sh test")])
def test_a_run_command_composes(command, conf_dir):
    words = shlex.split(command.removeprefix("L2D_JAX=cuda "))[1:]
    words = [w for w in words if w not in ("-m", "--multirun", "--cfg", "job")]
    words = [w.replace("<name>", "prob_l2d") for w in words]
    if any(PLACEHOLDER.search(w) for w in words):
        words = [w for w in words if not PLACEHOLDER.search(w)]  # the rest must still compose
    register_ray_launcher_config()
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        cfg = compose(config_name="config", overrides=first_of_each_sweep(words),
                      return_hydra_config=True)
    to_cell(cfg)  # types, ranges and every group resolve


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith(".venv/bin/")])
def test_a_python_entry_point_command_starts(command):
    words = shlex.split(command)
    program, rest = words[0], words[1:]
    if program.endswith("/python") and rest[:1] == ["-m"]:
        module = rest[1]
        sub = [w for w in rest[2:3] if not w.startswith("-") and module == "datasets"]
        args = [sys.executable, "-m", module, *sub, "--help"]
    else:  # another console script of the environment (mlflow ui ...), from the running one
        script = Path(sys.executable).with_name(Path(program).name)
        args = [str(script), *[w for w in rest if not w.startswith("-")][:1], "--help"]
    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


def test_the_dataset_example_is_a_valid_preset():
    preset = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.create(dataset_example()))
    dataset = OmegaConf.to_object(preset)
    assert dataset.task_spec().num_experts == 2


def readme_run_command(*words: str) -> list[str]:
    """The arguments after ``./run.sh`` of the one README command holding all ``words``."""
    (command,) = [c for c in README_COMMANDS
                  if c.startswith("./run.sh ") and set(words) <= set(c.split())]
    return shlex.split(command)[1:]


@pytest.mark.slow
def test_the_one_cell_example_then_the_estep_sweep_write_one_report(tmp_path):
    """The README's one-cell example and then its E-step sweep, into one output folder (on
    the tiny dataset, 2 epochs, untracked): both exit 0 and the sweep writes the report of
    all four cells, however ragged (one method row under `balanced` only, three E-step
    rows under `none` only)."""
    one_cell = readme_run_command("experiment=single", "workload=balanced", "seed=0")
    estep_sweep = readme_run_command("-m", "method.params.estep=exact,meanfield,reference")
    tiny = tiny_overrides(write_tiny_dataset(tmp_path / "tiny"), tmp_path / "outputs")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for args in (one_cell, estep_sweep):
        result = subprocess.run([sys.executable, "-m", "app", *args, *tiny], cwd=REPO_ROOT,
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
    records = sorted((tmp_path / "outputs/runs/single").rglob("result.json"))
    assert len(records) == 4
    report = tmp_path / "outputs/runs/single/report"
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.txt", "report.html"):
        assert (report / name).is_file(), f"{name} missing; stderr: {result.stderr[-3000:]}"
    with open(report / "leaderboard.csv", newline="") as rows:
        methods = {(row["workload"], row["method"]) for row in csv.DictReader(rows)
                   if row["role"] == "method"}
    assert sorted(w for w, _ in methods) == ["balanced", "none", "none", "none"]
    assert {m.split("[")[1].split(",")[0] for w, m in methods if "estep=" in m} == {
        "estep=meanfield", "estep=reference"}
