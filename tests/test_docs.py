"""The documentation a user follows: every relative link lands on a file of the repository (and a
heading there, when it names one), and every command it shows parses: each `dapft` and `torchrun`
flag is one the command's own `--help` lists, each script it runs exists and takes its flags."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
DOCS = sorted([REPO / name for name in ("README.md", "CONTRIBUTING.md", "TESTING.md", "BENCHMARKS.md",
                                        "REPRODUCTION.md")] + list((REPO / "docs").glob("*.md")))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_lands_inside_the_repository():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if REPO.resolve() not in path.parents and path != REPO.resolve() or not path.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file in the repository)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no heading '{anchor}' in {path.name})")
    assert not broken, "\n".join(broken)


def test_the_documents_point_at_nothing_outside_the_repository():
    for doc in DOCS:
        assert "shared/" not in doc.read_text(encoding="utf-8"), doc


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 160
    linked = set(LINK.findall(readme))
    missing = [p.name for p in (REPO / "docs").glob("*.md") if f"docs/{p.name}" not in linked]
    assert not missing, missing


def commands(kind: str) -> list[tuple[str, list[str]]]:
    """(where, words) of every command line of `kind` ('dapft', 'torchrun' or 'script') in the
    documents: in ```bash blocks (continuations joined) and in inline code."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        lines = [ln for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                 for ln in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`((?:dapft|python scripts/[^`\s]+|torchrun)(?: [^`]*)?)`", text)
        for line in lines:
            try:
                words = shlex.split(line.split(" #")[0], posix=True)
            except ValueError:  # a quote opened inside `python -c "..."`: its words are not flags
                words = line.split()
            while words and re.match(r"^[A-Z_]+=", words[0]):  # OMP_NUM_THREADS=1 ...
                words = words[1:]
            if not words:
                continue
            head = words[0]
            if kind == "dapft" and head == "dapft":
                found.append((doc.name, words[1:]))
            elif kind == "dapft" and head == "torchrun" and "dapft" in words:
                found.append((doc.name, words[words.index("dapft") + 1:]))
            elif kind == "torchrun" and head == "torchrun":
                found.append((doc.name, words[1:words.index("-m")] if "-m" in words else words[1:]))
            elif kind == "script" and head == "python" and len(words) > 1 and words[1].startswith("scripts/"):
                found.append((doc.name, words[1:]))
    return found


@lru_cache(maxsize=None)
def help_flags(*argv: str) -> frozenset[str]:
    proc = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, (argv, proc.stderr[-1000:])
    return frozenset(FLAG.findall(proc.stdout))


def test_every_dapft_command_in_the_documents_uses_flags_its_help_lists():
    known = {"finetune", "eval", "sweep", "demo", "make-dataset"}
    wrong, checked = [], 0
    for where, words in commands("dapft"):
        words = [w for w in words if w != "--debug"]
        if not words or words[0] not in known:
            continue  # `dapft COMMAND --help`, a placeholder
        flags = help_flags("-m", "dapft", words[0])
        wrong += [f"{where}: dapft {words[0]} {flag}" for flag in FLAG.findall(" ".join(words[1:]))
                  if flag not in flags]
        checked += 1
    assert checked >= 15 and not wrong, wrong


def test_every_torchrun_command_in_the_documents_uses_flags_torchrun_takes():
    flags = help_flags("-m", "torch.distributed.run")
    found = commands("torchrun")
    wrong = [f"{where}: torchrun {flag}" for where, words in found for flag in FLAG.findall(" ".join(words))
             if flag not in flags]
    assert found and not wrong, wrong


@pytest.mark.slow  # each script's --help imports torch and transformers: about 20 s in all
def test_every_script_the_documents_run_exists_and_takes_their_flags():
    found = commands("script")
    wrong = []
    for where, words in found:
        if not (REPO / words[0]).is_file():
            wrong.append(f"{where}: {words[0]} does not exist")
            continue
        flags = help_flags(words[0])
        wrong += [f"{where}: {words[0]} {flag}" for flag in FLAG.findall(" ".join(words[1:])) if flag not in flags]
    assert len(found) >= 10 and not wrong, wrong


def test_the_library_example_runs_as_written():
    """docs/library.md's first example, executed: the DAP loss of random candidates and its gradient."""
    text = (REPO / "docs" / "library.md").read_text(encoding="utf-8")
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    scope: dict = {}
    exec(compile(code, "docs/library.md", "exec"), scope)
    assert 0 <= float(scope["loss"].detach()) <= 1 and scope["scores"].grad is not None
