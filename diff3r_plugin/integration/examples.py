"""The examples' ``--upstream`` path: the upstream repository's own training, with ``+optimizer=diff3r``.

``examples/wrap_mvsplat.py --upstream PATH [--repo ...]`` and ``examples/wrap_noposplat.py
--upstream PATH`` call :func:`run_upstream_example`. It runs ``python -m src.main
+experiment=re10k +optimizer=diff3r ...`` in the checkout (through ``diff3r cpu-run`` when
there is no CUDA device), with the CPU-size overrides below, and prints the
``diff3r_report.json`` the plugin's Hydra callback wrote. There is no separate training loop:
what runs is the upstream ``ModelWrapper.training_step``, its optimizer and its checkpointing.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["REPO_OVERRIDES", "example_overrides", "run_upstream_example", "upstream_command"]

#: The shared RE10K demo chunk beside the repository (``../shared/data/...``).
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "re10k_demo_padded360x640"

#: CPU-size overrides per repository: ``{data}``, ``{index}``, ``{h}``, ``{w}`` and ``{steps}`` are filled in.
#: The LPIPS loss of the re10k experiments is dropped because its VGG weights would be
#: downloaded; random weights are used (``unimatch_weights_path=null``,
#: ``pretrained_weights=''``, pixelSplat's ResNet backbone instead of DINO from torch hub).
#: The training view sampler picks context views 25-45 frames apart, more than a demo scene
#: has; the evaluation sampler with the data's own index is used for training instead.
#: NoPoSplat's Trainer takes no ``num_sanity_val_steps`` from the config (Lightning's 2 apply).
_POSE_GIVEN = ["dataset.roots=[{data}]", "dataset.image_shape=[{h},{w}]", "dataset/view_sampler=evaluation",
               "dataset.view_sampler.index_path={index}", "trainer.num_sanity_val_steps=0"]
#: MVSplat's and DepthSplat's re10k experiments also set ``loss.lpips`` settings: deleted too.
REPO_OVERRIDES: Dict[str, List[str]] = {
    "mvsplat": _POSE_GIVEN + ["~loss.lpips", "model.encoder.unimatch_weights_path=null"],
    "depthsplat": _POSE_GIVEN + ["~loss.lpips", "model.encoder.unimatch_weights_path=null"],
    "pixelsplat": _POSE_GIVEN + ["model/encoder/backbone=resnet"],
    "noposplat": ["dataset.re10k.roots=[{data}]", "dataset.re10k.input_image_shape=[{h},{w}]",
                  "dataset/view_sampler@dataset.re10k.view_sampler=evaluation",
                  "dataset.re10k.view_sampler.index_path={index}", "model.encoder.pretrained_weights=''"],
}
_COMMON = ["+experiment=re10k", "wandb.mode=disabled", "loss=[mse]",
           "data_loader.train.num_workers=0", "data_loader.train.persistent_workers=false",
           "data_loader.train.batch_size=1", "data_loader.val.num_workers=0",
           "data_loader.val.persistent_workers=false", "trainer.max_steps={steps}",
           "trainer.val_check_interval={val}",
           "checkpointing.every_n_train_steps={steps}"]


def _train_root(data: Path, scratch: Path) -> Path:
    """``data`` itself when it has a ``train`` split; else a directory whose ``train`` and
    ``test`` both link to its ``test`` split (enough for plumbing runs on a demo chunk)."""
    if (data / "train").is_dir():
        return data
    if not (data / "test").is_dir():
        raise FileNotFoundError(f"{data} has neither a train nor a test split (pixelSplat chunk layout)")
    root = scratch / "data"
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        link = root / split
        if not link.exists():
            link.symlink_to((data / "test").resolve(), target_is_directory=True)
    for index in data.glob("*.json"):  # evaluation indices, next to the splits
        if not (root / index.name).exists():
            (root / index.name).symlink_to(index.resolve())
    return root


def example_overrides(repo: str, data: Path, image_size: int, steps: int,
                      diff3r: Sequence[str] = (), extra: Sequence[str] = (),
                      index: Optional[Path] = None) -> List[str]:
    """The Hydra overrides of one example run (``+optimizer=diff3r`` and ``diff3r.*`` last).

    ``index`` is the evaluation-index JSON that picks each scene's views (default
    ``<data>/evaluation_index_2ctx.json``, which the shared demo chunk ships).
    """
    if repo not in REPO_OVERRIDES:
        raise ValueError(f"unknown upstream repository {repo!r}; expected one of {sorted(REPO_OVERRIDES)}")
    # The train split holds 3 scenes; Lightning refuses a validation interval above that unless
    # the Trainer counts it in steps (NoPoSplat's check_val_every_n_epoch=None): there, no
    # validation at all (it computes LPIPS, unavailable offline).
    index = index or Path(data) / "evaluation_index_2ctx.json"
    val = 10 ** 6 if repo == "noposplat" else 3
    values = {"data": str(data), "index": str(index), "h": image_size, "w": image_size, "steps": steps, "val": val}
    out = [o.format(**values) for o in _COMMON + REPO_OVERRIDES[repo]]
    return out + list(extra) + ["+optimizer=diff3r"] + [f"diff3r.{kv}" for kv in diff3r]


def upstream_command(overrides: Sequence[str], device: str = "auto") -> List[str]:
    """``python -m src.main ...``, through ``diff3r cpu-run`` unless CUDA is used.

    On the CPU the sanity validation is switched off through the Trainer itself (NoPoSplat's
    config has no key for it, and its validation computes LPIPS, unavailable offline).
    """
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return [sys.executable, "-m", "diff3r_plugin.cli", "cpu-run", "--trainer", "num_sanity_val_steps=0",
                "-m", "src.main", *overrides]
    return [sys.executable, "-m", "src.main", *overrides]


def _parser(repo: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"Train an upstream {repo} checkout through Diff3R")
    p.add_argument("--upstream", required=True, help="upstream checkout (the directory with src/ and config/)")
    p.add_argument("--repo", default=None, choices=sorted(REPO_OVERRIDES),
                   help=f"which repository --upstream holds (default {repo})")
    p.add_argument("--checkpoint", default=None, help="a Lightning checkpoint to start from (checkpointing.load)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="pixelSplat-format RE10K root")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--image-size", type=int, default=64, help="square image size (multiple of 16)")
    p.add_argument("--steps", type=int, default=2, help="upstream training steps (trainer.max_steps)")
    p.add_argument("--tto-steps", type=int, default=2, help="inner TTO steps (diff3r.steps)")
    p.add_argument("--inner-solver", default=None, choices=["adam", "lm"])
    p.add_argument("--pcg-maxiter", type=int, default=None)
    p.add_argument("--diff3r", action="append", default=[], metavar="KEY=VALUE",
                   help="extra diff3r.* override, e.g. --diff3r lambda_mode=constant")
    p.add_argument("--point-depth-init", type=float, default=None, metavar="DEPTH",
                   help="NoPoSplat with random weights: diff3r.point_depth_init (default 2 for noposplat "
                        "without --checkpoint)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="any other Hydra override for the upstream run")
    p.add_argument("--output", default=None, help="Hydra output directory (default: a new temporary one)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    return p


def run_upstream_example(repo: str, argv: Optional[Sequence[str]] = None) -> int:
    """Run the upstream's own ``src.main`` with ``+optimizer=diff3r``; print the report.

    Args:
        repo: The repository the example is named after (``--repo`` overrides it).
        argv: The example's command line (``--upstream PATH`` required); options only the
            built-in path knows are ignored.

    Returns:
        The exit status of the upstream run (1 when it wrote no report).
    """
    args, _ = _parser(repo).parse_known_args(argv)
    repo = args.repo or repo
    upstream = Path(args.upstream).resolve()
    if not (upstream / "src" / "main.py").is_file():
        print(f"{upstream} is not an upstream checkout (no src/main.py)", file=sys.stderr)
        return 2
    output = Path(args.output).resolve() if args.output else Path(tempfile.mkdtemp(prefix=f"diff3r_{repo}_"))
    data = _train_root(Path(args.data).resolve(), output)
    diff3r = [f"steps={args.tto_steps}"] + list(args.diff3r)
    if args.inner_solver:
        diff3r.append(f"inner_solver={args.inner_solver}")
    if args.pcg_maxiter:
        diff3r.append(f"pcg_maxiter={args.pcg_maxiter}")
    depth = args.point_depth_init
    if depth is None and repo == "noposplat" and not args.checkpoint:
        depth = 2.0  # random weights: otherwise every point sits before the near-plane cull
    if depth:
        diff3r.append(f"point_depth_init={depth}")
    extra = list(args.override) + [f"hydra.run.dir={output}"]
    if args.checkpoint:
        # Quoted: Lightning's checkpoint names contain '=' (epoch=0-step=2.ckpt).
        extra.append(f"checkpointing.load='{Path(args.checkpoint).resolve()}'")
    cmd = upstream_command(example_overrides(repo, data, args.image_size, args.steps, diff3r, extra), args.device)
    print("[diff3r] " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, cwd=str(upstream), stdout=sys.stderr if args.json else None)
    report_path = output / "diff3r_report.json"
    if not report_path.is_file():
        print(f"[diff3r] the run (exit status {proc.returncode}) wrote no {report_path}", file=sys.stderr)
        return proc.returncode or 1
    report = json.loads(report_path.read_text())
    report["upstream"], report["output_dir"], report["command"] = repo, str(output), cmd
    print(json.dumps(report, indent=None if args.json else 2))
    return proc.returncode
