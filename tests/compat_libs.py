"""Installs the libraries the compat tests compare against, at pinned versions, when missing.

DeepCTR-Torch and torch-rechub install with their own (small) dependencies; their ``torch``
requirement is already met, so no other torch is fetched. RecBole's declared dependencies
include ray and plotly, so it installs with ``--no-deps`` plus only the modules
``recbole.model.layers`` imports. Only the package registry is contacted.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirements(name: str):
    """The pins of ``requirements-<name>.txt`` (an optional extra of din_ops)."""
    with open(os.path.join(ROOT, f"requirements-{name}.txt")) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


# The shared dependencies at one version for every library: the tests install them into the
# running process, and a later install that changed a module already imported (scikit-learn,
# unpinned by DeepCTR-Torch and torch-rechub, pinned by the RecBole line below) breaks it.
SHARED = ["scikit-learn==1.7.2", "pandas==2.3.3"]

# library -> pip install commands (argument lists); the first package is the library itself
PINS = {
    # deepctr_torch/__init__ asks PyPI for a newer version with requests
    "deepctr_torch": [["deepctr-torch==0.3.0", "requests==2.34.2", *SHARED]],
    "torch_rechub": [["torch-rechub==0.9.0", *SHARED]],
    # recbole.model.layers imports recbole.utils: logging colours, yaml, pandas, scipy,
    # scikit-learn and torch.utils.tensorboard
    "recbole": [["--no-deps", "recbole==1.2.1"],
                ["colorlog==4.7.2", "colorama==0.4.4", "texttable==1.7.0", "tensorboard==2.21.0",
                 "pyyaml==6.0.3", "scipy==1.17.1", "tqdm==4.67.1", *SHARED]],
    # the optional extra requirements-torchrec.txt, with --no-deps as its header says
    "torchrec": [["--no-deps", *requirements("torchrec")]],
}


def require(library: str, module: str):
    """Imports ``module`` of ``library``, installing the pinned library (and its imports) first if needed."""
    from importlib.metadata import PackageNotFoundError, version

    name, pinned = next(a for a in PINS[library][0] if "==" in a).split("==")
    try:
        if version(name) == pinned:
            return importlib.import_module(module)
    except (PackageNotFoundError, ImportError):
        pass
    for args in PINS[library]:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                       check=True)
    importlib.invalidate_caches()
    return importlib.import_module(module)
