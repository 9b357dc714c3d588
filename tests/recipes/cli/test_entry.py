"""The ``kiln`` entry point: a cheap ``import recipes``, and the collector settings of the command line.

Each check runs in a fresh interpreter: what is imported, and the collector's state, are process-wide.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "KILN_GC"}
    result = subprocess.run([sys.executable, *(["-c", code] if code else []), *args], capture_output=True,
                            text=True, cwd=ROOT, env={**environ, **env}, timeout=180)
    assert result.returncode == 0, result.stderr
    return result


def test_importing_recipes_and_reading_a_recipe_load_neither_torch_nor_ignite():
    out = _python("import sys, recipes\n"
                  "print(sorted(m for m in ('torch', 'ignite', 'matplotlib') if m in sys.modules))\n"
                  "print(sorted(recipes.RECIPES))\n"
                  "print(recipes.get_recipe('digits').name)\n"
                  "print(sorted(m for m in ('torch', 'ignite', 'matplotlib') if m in sys.modules))\n").stdout.splitlines()
    assert out == ["[]", "['cifar10', 'digits', 'fashion-mnist', 'imagefolder', 'mnist', 'synthetic']", "digits", "[]"]


ENTRY = """
import gc, sys
from recipes.cli.entry import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
print(gc.isenabled(), gc.get_freeze_count(), "torch" in sys.modules, file=sys.stderr)
"""


def test_a_command_that_computes_freezes_its_start_up_objects_and_leaves_the_collector_on(tmp_path):
    enabled, frozen, torch_loaded = _python(ENTRY, "schedule", "digits", "--out", str(tmp_path)).stderr.split()
    assert enabled == "True" and torch_loaded == "True"
    assert int(frozen) > 100_000  # torch, ignite and kiln's modules: never walked by a collection again


@pytest.mark.parametrize("args", [["recipes"], ["show", "digits"], ["--help"], ["train", "--help"]])
def test_help_and_the_commands_that_read_configs_never_load_torch(args):
    enabled, _, torch_loaded = _python(ENTRY, *args).stderr.split()
    assert enabled == "True" and torch_loaded == "False"


def test_kiln_gc_default_leaves_the_collector_as_python_sets_it():
    enabled, frozen, _ = _python(ENTRY, "recipes", KILN_GC="default").stderr.split()
    assert (enabled, frozen) == ("True", "0")


def test_python_dash_m_recipes_is_the_kiln_command():
    listed = _python("", "-m", "recipes", "recipes").stdout
    installed = subprocess.run([str(Path(sys.executable).with_name("kiln")), "recipes"], capture_output=True,
                               text=True, cwd=ROOT, timeout=180)
    assert installed.returncode == 0, installed.stderr
    assert "digits" in listed and listed == installed.stdout


WINGS_LOADED = """
import sys
from recipes.cli.entry import main
import recipes.cli.commands
print(sorted({m.split('.')[1] for m in sys.modules if m.startswith(('recipes.report', 'recipes.tools', 'recipes.run'))}))
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
print(sorted({m.split('.')[1] for m in sys.modules if m.startswith(('recipes.report', 'recipes.tools', 'recipes.run'))}),
      file=sys.stderr)
"""


def test_the_command_line_loads_the_run_tools_and_report_wings_only_for_the_commands_that_need_them(tmp_path):
    listing = _python(WINGS_LOADED, "recipes")
    assert listing.stdout.splitlines()[0] == "[]"  # importing the commands loads none of them
    assert listing.stderr.strip() == "[]"  # nor does `kiln recipes`
    shown = _python(WINGS_LOADED, "show", "digits")
    assert shown.stderr.strip() == "[]"
    schedule = _python(WINGS_LOADED, "schedule", "digits", "--out", str(tmp_path))
    assert schedule.stderr.strip() == "['report', 'run', 'tools']"
