"""Packaging is configured in pyproject.toml; this only copies the top-level `prompts/`
folder (the agent's and explainer's prompts, the MCP investigation templates) into the
wheel as `tdb_agent/prompts/`, so a non-editable install finds them (tdb_agent.PROMPTS)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithPrompts(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install reads prompts/ from the checkout
            target = Path(self.build_lib) / "tdb_agent" / "prompts"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).resolve().parent / "prompts", target)


setup(cmdclass={"build_py": BuildPyWithPrompts})
