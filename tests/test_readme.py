"""Every command the README shows runs as written: commands in its bash blocks and in its
inline code are dry-run here (the configuration a ``./run.sh`` command composes, the
``--help`` of a Python entry point), and its dataset example is a valid preset. Commands
that need a GPU or data the user brings are composed all the same (their paths are not
read when composing)."""

from __future__ import annotations

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
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
INLINE = re.compile(r"`((?:L2D_JAX=cuda )?\./run\.sh[^`]*|\.venv/bin/[^`]*)`")
PLACEHOLDER = re.compile(r"\.\.\.|<[^>]+>|\bPATH\b")  # written for the reader to fill in


def readme_commands() -> list[str]:
    """Every command of a bash block (one per line, comments cut) and of inline code."""
    commands = []
    for body in re.findall(r"```bash\n(.*?)```", README, re.S):
        commands += [line.split("#")[0].strip() for line in body.splitlines() if line.strip()]
    commands += [m.group(1).strip() for m in INLINE.finditer(README)]
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


COMMANDS = readme_commands()


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
    assert "./run.sh" in COMMANDS and "./run.sh test" in COMMANDS and len(COMMANDS) > 20


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
