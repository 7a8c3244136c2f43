"""Wrap a pose-given encoder (MVSplat) with Diff3R, train a few steps, evaluate.

With ``--upstream PATH`` (a donydchen/mvsplat checkout) the upstream Hydra config is composed
with ``+experiment=re10k +optimizer=diff3r`` (the plugin's settings land at ``diff3r:``; the
upstream training ``optimizer:`` is untouched), the CUDA rasterizer import is stubbed on CPU,
the upstream ``EncoderCostVolume`` is built (random weights, or ``--checkpoint``), wrapped in
place (state_dict keys unchanged), trained for ``--steps`` Diff3R steps on ``--data`` and
evaluated (zero-shot vs. Diff3R TTO). ``--device cpu`` renders with the plugin's TorchDecoder.

Without ``--upstream`` the built-in ``TinyPoseGivenEncoder`` runs on an embedded scene.

Examples::

    python examples/wrap_mvsplat.py --json
    python examples/wrap_mvsplat.py --upstream ../mvsplat \
        --data ../shared/data/re10k_demo_padded360x640 --image-size 64 --steps 3 --json
"""

import argparse
import json
import sys

from diff3r_plugin.integration.upstream import add_example_args, run_builtin, run_upstream


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_example_args(parser)
    args = parser.parse_args(argv)
    if args.upstream:
        overrides = [f"diff3r.{kv}" for kv in args.diff3r] + [
            f"diff3r.steps={args.tto_steps}", f"diff3r.inner_solver={args.inner_solver}",
            f"diff3r.pcg_maxiter={args.pcg_maxiter}"]
        log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
        result = run_upstream(args.upstream, "mvsplat", args.data, image_shape=(args.image_size, args.image_size),
                              steps=args.steps, eval_scenes=args.eval_scenes, checkpoint=args.checkpoint,
                              device=args.device, diff3r_overrides=overrides, log_fn=log)
    else:
        result = run_builtin("pose_given", args)
    if result is None:
        return 1
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
