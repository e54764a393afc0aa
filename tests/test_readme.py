"""Every command the README shows runs as written, with `--help` in place of its arguments.

Commands are read from the README itself (code blocks and inline code): `python -m MODULE ...`,
`accelerate launch [OPTIONS] -m MODULE ...` and the console scripts `qrpo-*`. Each runs in a
fresh process from the repository root and must exit 0 with its usage; the config files they
name must exist. The quick start's two `bash run.sh` commands are what CI itself runs.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def _readme_lines() -> list[str]:
    text = README.read_text()
    lines = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        lines += block.replace("\\\n", " ").splitlines()  # continued lines are one command
    lines += re.findall(r"`([^`\n]+)`", text)
    return [line.split("  #")[0].strip() for line in lines]


def readme_commands() -> list[str]:
    starts = ("python -m ", "accelerate launch ", "qrpo-")
    return sorted({line for line in _readme_lines() if line.startswith(starts)})


def help_form(command: str) -> tuple[str, ...]:
    """The command up to what it runs, then --help: `accelerate launch --config_file F -m M`
    keeps accelerate's options, `python -m M a=b` becomes `python -m M --help`."""
    words = shlex.split(command.replace("...", ""))
    if words[0] == "python":
        return (sys.executable, "-m", words[2], "--help")
    if words[0] == "accelerate":
        module_at = words.index("-m") + 1
        return (str(BIN / "accelerate"), *words[1 : module_at + 1], "--help")
    return (str(BIN / words[0]), "--help")


COMMANDS = readme_commands()
HELP_FORMS = sorted({help_form(c) for c in COMMANDS})


def test_the_readme_shows_the_entry_points():
    """The parser finds what the README documents (so the test below cannot pass on nothing)."""
    modules = {form[2] for form in HELP_FORMS if form[1] == "-m"}
    assert {"qrpo.train", "qrpo.generate.pipeline", "qrpo.evaluate", "qrpo.slurm.train"} <= modules
    assert any(Path(form[0]).name == "accelerate" for form in HELP_FORMS)
    scripts = {Path(form[0]).name for form in HELP_FORMS if form[0].startswith(str(BIN / "qrpo-"))}
    assert {"qrpo-train", "qrpo-generate", "qrpo-evaluate", "qrpo-slurm-train"} <= scripts


def test_config_files_named_in_readme_commands_exist():
    named = {
        w for c in COMMANDS for w in shlex.split(c.replace("...", "")) if w.startswith("configs/")
    }
    assert named, "no configs/ path found in the README's commands"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"README names config files that do not exist: {missing}"


def _run(form: tuple[str, ...]) -> tuple[tuple[str, ...], subprocess.CompletedProcess]:
    out = subprocess.run(form, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return form, out


@pytest.mark.skipif(
    shutil.which("qrpo-train", path=str(BIN)) is None,
    reason="the project is not installed in this environment (pip install -e .)",
)
def test_every_readme_command_prints_its_help():
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_run, HELP_FORMS))
    failed = [
        f"{shlex.join(form)}: exit {out.returncode}\n{out.stderr[-1500:]}"
        for form, out in results
        if out.returncode != 0 or "usage:" not in out.stdout
    ]
    assert not failed, "\n\n".join(failed)
