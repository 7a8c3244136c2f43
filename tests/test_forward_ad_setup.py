"""The project's forward-mode products run without torch's ``torch.jit.script`` deprecation
warning (emitted by torch's own lazy import of its jvp decompositions), and the filter does not
outlive that import."""

import subprocess
import sys

SCRIPT = r"""
import warnings
import torch
import diff3r_plugin.layer  # noqa: F401
torch.func.jvp(lambda x: (x * x).sin(), (torch.ones(3),), (torch.ones(3),))
from diff3r_plugin.forward_ad_setup import _DEPRECATION
assert not any(f[1] is not None and f[1].pattern == _DEPRECATION for f in warnings.filters)
print("done")
"""


def test_first_jvp_emits_no_jit_deprecation_warning():
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", SCRIPT],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "done"
