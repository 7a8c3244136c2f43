"""Load torch's forward-mode AD decompositions once, without their deprecation warning.

The first forward-mode product in a process (``torch.func.jvp``, ``jacfwd``; the layer's
matrix-vector products and the pose-free encoder's PnP use them) imports
``torch._decomp.decompositions_for_jvp``, which registers its decompositions through
``torch.jit.script`` and so emits torch's ``FutureWarning`` that ``torch.jit.script`` is
deprecated. The project never calls ``torch.jit.script`` itself; that warning says nothing
to its users. Doing the same import here, with exactly that warning ignored for the duration
of the import, leaves every other warning (and ``torch.jit.script`` calls elsewhere) as it is.
The import is cached, so torch's own later import is a no-op.
"""

import warnings

_DEPRECATION = r"`torch\.jit\.script` is deprecated"


def load_forward_ad_decompositions() -> bool:
    """Import the decompositions now (as torch would on the first ``make_dual``); True if done."""
    try:
        from torch.autograd import forward_ad
    except ImportError:  # pragma: no cover - torch without forward AD
        return False
    loader = getattr(forward_ad, "_maybe_load_decompositions", None)
    if loader is None:  # torch versions that load them differently: nothing to quieten
        return False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=FutureWarning)
        loader()
    return True


load_forward_ad_decompositions()
