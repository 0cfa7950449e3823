"""The package map: the top-level folders install under the one ``corral`` namespace.

Everything else about the distribution is in setup.cfg.
"""

from setuptools import find_packages, setup

FOLDERS = ("supervisor", "agent_proc", "web")

setup(
    package_dir={"corral": "corral", **{f"corral.{folder}": folder for folder in FOLDERS}},
    packages=["corral", *(f"corral.{folder}{'.' + sub if sub else ''}"
                          for folder in FOLDERS for sub in ("", *find_packages(folder)))],
)
