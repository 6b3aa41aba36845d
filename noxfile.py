"""Sessions: tests (everything, one environment), isolated (one fresh venv per package),
lint (ruff), checks (versions, layering, generated docs), demo (the main end-to-end job: pretrain,
SFT, export and generate with a tiny model on CPU),
bench (kernel and checkpoint-conversion benchmarks; not in the default set: minutes, ~16 GiB of
memory and ~9 GiB of disk at full size).

torch and megatron-core are pinned by constraints.txt. Sibling packages are always installed
from this tree, all paths in one pip call, so pip never takes a same-named package from an index.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "tools"))
from repo import load_packages, sibling_closure  # noqa: E402

nox.options.sessions = ["lint", "checks", "tests", "isolated"]
nox.options.reuse_existing_virtualenvs = True
PYTHON = "3.11"
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
TEST_TOOLS = ("pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3")
# What the tests compare against that no package depends on (Hugging Face's RoPE tables, logits).
TEST_REFERENCES = ("transformers",)
PACKAGES = sorted(load_packages())
# CI sets this: each isolated venv (~1 GB with torch) is deleted once its tests pass, so the
# eight of them never sit on the disk together.
PRUNE_VENVS = os.environ.get("MINDSPEED_PRUNE_VENVS") == "1"


def _pip(session: nox.Session, *args: str) -> None:
    session.run("python", "-m", "pip", "install", "--disable-pip-version-check", "-q", *CONSTRAINTS, *args)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Every package installed editable in one environment; the whole suite."""
    editable = [a for p in PACKAGES for a in ("-e", str(ROOT / "packages" / p))]
    _pip(session, *TEST_TOOLS, *TEST_REFERENCES, "packaging", *editable)
    session.run("pytest", "-q", *(session.posargs or ["packages", "tools/tests"]))


@nox.session(python=PYTHON)
@nox.parametrize("package", PACKAGES)
def isolated(session: nox.Session, package: str) -> None:
    """A fresh venv with one package and only what it declares, then that package's tests."""
    closure = sibling_closure(package)
    _pip(session, *TEST_TOOLS, *(str(ROOT / "packages" / d) for d in closure))
    session.run("python", str(ROOT / "tools" / "check_install.py"), *closure)
    session.run("pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "packages" / package / "tests"))
    if PRUNE_VENVS:
        shutil.rmtree(session.virtualenv.location, ignore_errors=True)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    _pip(session, "ruff==0.17.6")
    session.run("ruff", "check", "packages", "tools", "noxfile.py")


@nox.session(python=PYTHON)
def checks(session: nox.Session) -> None:
    """Sibling ranges and changelogs, import layering, and generated docs' freshness."""
    docs_sources = ("mindspeed-args", "mindspeed-kernels", "mindspeed-parallel", "mindspeed-models")
    _pip(session, "packaging", *(str(ROOT / "packages" / p) for p in docs_sources))
    session.run("python", "tools/check_versions.py")
    session.run("python", "tools/check_layering.py")
    session.run("python", "tools/gen_args_docs.py", "--check")
    session.run("python", "tools/gen_kernels_docs.py", "--check")
    session.run("python", "tools/gen_models_docs.py", "--check")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks (not run by default): kernels (ours vs naive formulas, time and peak-memory
    ratios), ckpt (checkpoint conversion vs ``cp``, throughput and peak RSS) and train (tokens/s of
    the training loop vs transformers + torch AdamW). ``-- NAME ARGS`` runs one of them with its own
    arguments; no arguments runs all."""
    scripts = {"kernels": "tools/bench/kernels.py", "ckpt": "tools/bench/ckpt.py", "train": "tools/bench/train.py"}
    # train.py runs the mindspeed-train loop against transformers (a mindspeed-train dependency).
    siblings = dict.fromkeys(["mindspeed-kernels", "mindspeed-ckpt", *sibling_closure("mindspeed-train")])
    _pip(session, *(str(ROOT / "packages" / p) for p in siblings))
    which, args = (session.posargs[0], session.posargs[1:]) if session.posargs[:1] and session.posargs[0] in scripts \
        else (None, session.posargs)
    for name in [which] if which else scripts:
        session.run("python", scripts[name], *args)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job end to end on CPU (examples/demo.sh): tokenizer, preprocess, pretrain a tiny
    DeepSeek-V3-style model on 2 processes, SFT, export to Hugging Face, generate. Minutes, no downloads
    (besides the install); outputs in $DEMO_DIR or a fresh temporary directory."""
    closure = list(dict.fromkeys([*sibling_closure("mindspeed-train"), *sibling_closure("mindspeed-cli")]))
    _pip(session, *(str(ROOT / "packages" / d) for d in closure))
    session.run("python", str(ROOT / "tools" / "check_install.py"), *closure)
    session.run("bash", str(ROOT / "examples" / "demo.sh"), external=True)
