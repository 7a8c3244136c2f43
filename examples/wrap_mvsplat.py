"""Wrap a pose-given encoder (MVSplat) with Diff3R, train a few steps, evaluate.

With ``--upstream PATH`` (a donydchen/mvsplat checkout) the upstream Hydra config is composed
with ``+experiment=re10k +optimizer=diff3r`` (the plugin's settings land at ``diff3r:``; the
upstream training ``optimizer:`` is untouched), the CUDA rasterizer import is stubbed on CPU,
the upstream ``EncoderCostVolume`` is built (random weights, or ``--checkpoint``), wrapped in
place (state_dict keys unchanged), trained for ``--steps`` Diff3R steps on ``--data`` and
evaluated (zero-shot vs. Diff3R TTO). ``--device cpu`` renders with the plugin's TorchDecoder.

Without ``--upstream`` (the main job, offline, about a minute of CPU time) the built-in
pose-given ``TinyPoseGivenEncoder`` is trained briefly with and without the Diff3R layer on embedded
scenes, and held-out scenes are evaluated as zero-shot, zero-shot + TTO and Diff3R + TTO: a
table (PSNR, SSIM, LPIPS, TTO steps), ``grid.png``, ``psnr_vs_steps.png``, ``lambda_map.png``
and ``demo.json`` in ``--out`` (default ``outputs/wrap_mvsplat/``); see ``diff3r_plugin.demo``.

Examples::

    python examples/wrap_mvsplat.py
    python examples/wrap_mvsplat.py --json --out /tmp/mvsplat_demo
    python examples/wrap_mvsplat.py --upstream ../mvsplat \
        --data ../shared/data/re10k_demo_padded360x640 --image-size 64 --steps 3 --json
    python examples/wrap_mvsplat.py --repo depthsplat --upstream ../depthsplat --steps 2 --json

``--repo pixelsplat`` or ``--repo depthsplat`` runs the same with those pose-given encoders
(pixelSplat and DepthSplat load their DINO / DINOv2 backbones through ``torch.hub``; see
``offline_torch_hub`` for running them without a network).
"""

import sys

from diff3r_plugin.demo import example_main

if __name__ == "__main__":
    sys.exit(example_main("mvsplat", "pose_given", __doc__, sys.argv[1:], default_out="outputs/wrap_mvsplat"))
