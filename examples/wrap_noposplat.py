"""Wrap a pose-free encoder (NoPoSplat) with Diff3R, train a few steps, evaluate.

With ``--upstream PATH`` (a cvg/NoPoSplat checkout) the upstream Hydra config is composed
with ``+experiment=re10k +optimizer=diff3r`` (the plugin's settings land at ``diff3r:``; the
upstream training ``optimizer:`` is untouched), the CUDA rasterizer import is stubbed on CPU,
the upstream ``EncoderNoPoSplat`` (612 M params) is built (random weights, or ``--checkpoint``), wrapped in
place (state_dict keys unchanged), trained for ``--steps`` Diff3R steps on ``--data`` and
evaluated (zero-shot vs. Diff3R TTO). The context images come in normalized to [-1, 1] by the
NoPoSplat shim (the adapter maps them back), context view 0 is the identity and the pose of
view 1 is estimated by PnP on its predicted means, then refined in the TTO (layout pose group). ``--device cpu`` renders with the plugin's TorchDecoder.

Without ``--upstream`` (the main job, offline, about a minute of CPU time) the built-in
pose-free ``TinyPoseFreeEncoder`` is trained briefly with and without the Diff3R layer on embedded
scenes, and held-out scenes are evaluated as zero-shot, zero-shot + TTO and Diff3R + TTO: a
table (PSNR, SSIM, LPIPS, TTO steps), ``grid.png``, ``psnr_vs_steps.png``, ``lambda_map.png``
and ``demo.json`` in ``--out`` (default ``outputs/wrap_noposplat/``); see ``diff3r_plugin.demo``.

Examples::

    python examples/wrap_noposplat.py
    python examples/wrap_noposplat.py --json --out /tmp/noposplat_demo
    python examples/wrap_noposplat.py --upstream ../NoPoSplat \
        --data ../shared/data/re10k_demo_padded360x640 --image-size 64 --steps 3 --json
"""

import sys

from diff3r_plugin.demo import example_main

if __name__ == "__main__":
    sys.exit(example_main("noposplat", "pose_free", __doc__, sys.argv[1:], default_out="outputs/wrap_noposplat"))
