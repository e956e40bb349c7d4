"""A non-editable install carries what the package reads at run time: the bundled model,
SAEs, dataset, and the prompts (a wheel is what `pip install tdb-agent` unpacks)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_prompts_and_assets(tmp_path):
    # built from a copy: setuptools writes build/ and *.egg-info next to the sources
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "runs", "tdb-workspace", "artifacts", "evals"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True)
    wheel = next((tmp_path / "dist").glob("tdb_agent-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ["prompts/agent_system.md", "prompts/explain_component.md", "prompts/simulate_activations.md",
                "assets/tdb-tiny/config.json", "assets/tdb-tiny/model.safetensors"]:
        assert f"tdb_agent/{rel}" in names, rel
    assert any(n.startswith("tdb_agent/prompts/investigations/") and n.endswith(".md") for n in names)
    assert any(n.startswith("tdb_agent/viewer/static/") for n in names), "the viewer's pages"
    # unpacked (as pip installs it), the package reads its own copy of the prompts
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run([sys.executable, "-c", "import tdb_agent; print(tdb_agent.PROMPTS)"], cwd=tmp_path,
                         env={"PYTHONPATH": str(site)}, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out) == site / "tdb_agent" / "prompts" and (Path(out) / "agent_system.md").is_file()


def test_prompts_are_the_top_level_folder_of_a_checkout():
    from tdb_agent import PROMPTS
    from tdb_agent.server.prompts import load_templates

    assert PROMPTS == ROOT / "prompts"
    assert not (ROOT / "tdb_agent" / "prompts").exists(), "one home for the prompts: prompts/"
    assert (PROMPTS / "agent_system.md").is_file()
    assert load_templates()
