"""Installs the libraries the compat tests compare against, at pinned versions, when missing.

``pip install --no-deps`` of each library and of only the modules it imports at import time
(never anything that would bring another torch). Only the package registry is contacted.
"""
from __future__ import annotations

import importlib
import subprocess
import sys

_SKLEARN = ["scikit-learn==1.7.2", "joblib==1.6.0", "threadpoolctl==3.8.0"]
_PANDAS = ["pandas==2.3.3", "pytz==2026.4", "tzdata==2026.4", "python-dateutil==2.9.0.post0", "six==1.17.0"]
PINS = {
    # deepctr_torch/__init__ imports its models (sklearn.metrics) and checks PyPI for a newer version
    "deepctr_torch": ["deepctr-torch==0.3.0", "tqdm==4.67.1", "requests==2.34.2", *_SKLEARN],
    # torch_rechub/__init__ imports its trainers and utils (pandas, sklearn, tqdm)
    "torch_rechub": ["torch-rechub==0.9.0", "tqdm==4.67.1", *_SKLEARN, *_PANDAS],
    # recbole.model.layers imports recbole.utils (logging colours, pandas, torch.utils.tensorboard)
    "recbole": ["recbole==1.2.1", "colorlog==6.12.0", "texttable==1.7.2", "tensorboard==2.21.0", "protobuf==7.36.2",
                "absl-py==2.5.1", "tqdm==4.67.1", *_PANDAS],
}


def require(library: str, module: str):
    """Imports ``module`` of ``library``, installing the pinned library (and its imports) first if needed."""
    from importlib.metadata import PackageNotFoundError, version

    name, pinned = PINS[library][0].split("==")
    try:
        if version(name) == pinned:
            return importlib.import_module(module)
    except (PackageNotFoundError, ImportError):
        pass
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
                    *PINS[library]], check=True)
    importlib.invalidate_caches()
    return importlib.import_module(module)
