"""The wheel: built from this tree, installed in a clean venv, importable by its real name."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC_NAMES = {"shared", "saver", "ingestor_worker", "local", "tests", "infra", "bench"}


@pytest.mark.slow
def test_wheel_installs_into_clean_venv_under_the_langgraph_namespace(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = dist.glob("langgraph_checkpoint_kusto-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import sysconfig, langgraph.checkpoint.kusto as k;"
            "from langgraph.checkpoint.kusto import KustoSaver, AsyncKustoSaver;"
            "from langgraph.checkpoint.kusto.schema import provision_commands;"
            "assert provision_commands();"
            "print(sysconfig.get_paths()['purelib'])",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    site_packages = Path(probe.stdout.strip())
    top_level = {p.name for p in site_packages.iterdir()}
    generic = GENERIC_NAMES & top_level
    assert not generic, f"generic top-level modules: {generic}"
    assert (site_packages / "langgraph" / "checkpoint" / "kusto" / "provision.kql").is_file()
    cli = subprocess.run(
        [str(env_dir / "bin" / "langgraph-kusto"), "--help"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "provision" in cli.stdout
