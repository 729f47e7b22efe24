"""dalab: a domain-adaptation research codebase.

Layout (one installed package, several source folders):

- ``dalab.methods``    (methods/)    the shared :class:`~dalab.methods.base.Method` interface and every method
- ``dalab.datasets``   (datasets/)   domain registry, splits, label budgets, offline digits domains
- ``dalab.benchmarks`` (benchmarks/) benchmark scripts and specs
- ``dalab.trainer``    the one training loop; ``dalab.cli`` the ``dalab`` command

``import dalab`` is deliberately light: it imports neither torch nor any method.
"""

__version__ = "0.1.0"

import warnings as _warnings

# pytorch-adapt imports torchmetrics, whose version check imports setuptools' pkg_resources (pinned
# below 81 by the install, docs/install.md): its deprecation notice says nothing to a dalab user and filled bench logs
_warnings.filterwarnings("ignore", message="pkg_resources is deprecated as an API", category=UserWarning)
