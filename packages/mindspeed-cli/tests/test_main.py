"""The `mindspeed` command: plugin discovery, lazy import, broken plugins, --version, env."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def _fake_dist(root, name: str, entry_points: str, module: str | None = None, code: str = "") -> None:
    info = root / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    if module:
        (root / f"{module}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def plugins(tmp_path):
    """A path with one working plugin (that records its import) and one broken plugin."""
    _fake_dist(tmp_path, "mindspeed-fake", "[mindspeed.commands]\nhello = fake_hello:main\n", "fake_hello", """
        import os
        open(os.environ["IMPORT_LOG"], "a").write("imported\\n")
        def main(argv):
            print("hello", *argv)
            return 0
        """)
    _fake_dist(tmp_path, "mindspeed-broken", "[mindspeed.commands]\nbroken = fake_broken:main\n", "fake_broken",
               "raise ImportError('needs a missing library')\n")
    return tmp_path


def run(plugins, *argv):
    env = dict(os.environ, PYTHONPATH=str(plugins), IMPORT_LOG=str(plugins / "log"))
    return subprocess.run([sys.executable, "-m", "mindspeed_cli.main", *argv], capture_output=True, text=True,
                          env=env, timeout=60)


def _absent_known_command() -> tuple[str, str]:
    """(command, distribution) of a KNOWN command whose package is not installed in this environment."""
    from mindspeed_cli.plugins import KNOWN, installed

    absent = sorted((name, dist) for name, (dist, _) in KNOWN.items() if name not in installed())
    if not absent:
        pytest.skip("every known mindspeed command is installed here")
    return absent[0]


def test_help_lists_commands_without_importing_them(plugins):
    r = run(plugins, "--help")
    assert r.returncode == 0
    assert "hello" in r.stdout and "broken" in r.stdout and "env" in r.stdout
    _, dist = _absent_known_command()
    assert "not installed:" in r.stdout and f"pip install {dist}" in r.stdout
    assert not (plugins / "log").exists()  # nothing was imported to list the commands


def test_command_runs_and_a_broken_plugin_is_one_line(plugins):
    r = run(plugins, "hello", "world")
    assert r.returncode == 0 and r.stdout.strip() == "hello world"
    r = run(plugins, "broken")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "failed to import" in r.stderr and "Traceback" not in r.stderr
    assert run(plugins, "hello").returncode == 0  # the others still work


def test_version_lists_installed_mindspeed_packages(plugins):
    r = run(plugins, "--version")
    assert r.returncode == 0
    assert "mindspeed-cli 0.1.0" in r.stdout and "mindspeed-fake 0.1.0" in r.stdout


def test_unknown_command_names_the_package_to_install(plugins):
    command, dist = _absent_known_command()
    r = run(plugins, command)
    assert r.returncode == 2 and f"install {dist}" in r.stderr


def test_env_reports_versions_device_and_backend(plugins):
    r = run(plugins, "env")
    assert r.returncode == 0
    for key in ("python", "torch", "megatron-core", "transformers", "device", "collective backend", "kernel backends"):
        assert key in r.stdout
    assert any(b in r.stdout for b in ("gloo", "nccl", "hccl"))
    assert "reference ok" in r.stdout or "mindspeed-kernels not installed" in r.stdout
