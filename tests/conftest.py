"""Every annotated shape in the package is checked while the tests run.

The import hook wraps each function and dataclass of ``diff3r_plugin`` (the adapters included:
they are installed as ``diff3r_plugin.adapters``) in ``jaxtyping.jaxtyped(typechecker=beartype)``,
so a tensor whose shape or dtype contradicts its annotation (or any other argument that
contradicts its type hint) raises
``jaxtyping.TypeCheckError``. It has to be installed before the package is first imported.

Users do not run the hook: on bad input they get the package's own typed errors
(``diff3r_plugin.errors``). Tests of those errors are marked ``user_errors`` (and everything
under ``tests/contract/`` counts as such); they run with the hook switched off, so that they
check exactly what a user sees.
"""

import sys
from pathlib import Path

import jaxtyping
import pytest

assert not any(name == "diff3r_plugin" or name.startswith("diff3r_plugin.") for name in sys.modules), \
    "diff3r_plugin was imported before the jaxtyping import hook was installed"
# PEP 484's numeric tower (an int is a valid ``float``), as static type checkers read the hints.
jaxtyping.install_import_hook(
    "diff3r_plugin", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

_CONTRACT = Path(__file__).parent / "contract"


@pytest.fixture(autouse=True)
def _shape_checks(request):
    """Switch the hook's checks off for tests of the errors users get (see module docstring)."""
    user_errors = (request.node.get_closest_marker("user_errors") is not None
                   or _CONTRACT in Path(str(request.node.fspath)).parents)
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", before or user_errors)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: intra-op threads only add
    contention on a shared CPU (10-40x slower). The reduction order of these tests is then
    fixed; the ``OMP_NUM_THREADS=1`` rerun in ``.ci/run`` varies it for the others."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

