"""The adapter contract and the Hydra-callback path against real upstream checkouts.

Skipped unless the checkouts are given.

Set ``DIFF3R_UPSTREAM_MVSPLAT`` / ``DIFF3R_UPSTREAM_PIXELSPLAT`` / ``DIFF3R_UPSTREAM_DEPTHSPLAT``
/ ``DIFF3R_UPSTREAM_NOPOSPLAT`` to a donydchen/mvsplat, dcharatan/pixelsplat, cvg/depthsplat or
cvg/NoPoSplat checkout (their Python deps installed: dacite, e3nn, pytorch_lightning, wandb,
colorama, colorspacious, opencv, scikit-video, ...). The CUDA rasterizer and moviepy imports are
stubbed (and ``matplotlib.cm.get_cmap`` re-added for DepthSplat), weights are random (no
download: pixelSplat uses its ResNet backbone, DepthSplat's DINOv2 is built from a local
facebookresearch/dinov2 checkout by ``offline_torch_hub``, found through
``DIFF3R_TORCH_HUB_FACEBOOKRESEARCH_DINOV2`` or the torch hub cache; skipped without one),
images are 64x64 from ``DIFF3R_TEST_RE10K`` (default: the shared padded RE10K demo chunk), the
TTO is cheap (1 Adam step).

``test_real_upstream_trains_through_callback`` runs the path a user runs: the upstream's own
``python -m src.main +experiment=re10k +optimizer=diff3r`` through ``diff3r cpu-run`` (two
training steps), then checks the ``diff3r_report.json`` and the saved checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

DATA = Path(os.environ.get("DIFF3R_TEST_RE10K", str(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "re10k_demo_padded360x640")))
# (case id, UPSTREAM_SPECS key, env var, extra overrides)
CASES = [
    ("mvsplat", "mvsplat", "DIFF3R_UPSTREAM_MVSPLAT", []),
    ("noposplat", "noposplat", "DIFF3R_UPSTREAM_NOPOSPLAT", []),
    ("pixelsplat", "pixelsplat", "DIFF3R_UPSTREAM_PIXELSPLAT", []),
    ("depthsplat", "depthsplat", "DIFF3R_UPSTREAM_DEPTHSPLAT", []),
    # The base/large models' multi-scale depth: in training mode the encoder returns the
    # intermediate and final predictions concatenated along the batch (b * 2 rows).
    ("depthsplat-2scales", "depthsplat", "DIFF3R_UPSTREAM_DEPTHSPLAT",
     ["model.encoder.num_scales=2", "model.encoder.upsample_factor=2",
      "model.encoder.lowest_feature_resolution=4"]),
]
#: SH degree of each repo's re10k encoder config (UPSTREAM.md section 1).
SH_DEGREE = {"mvsplat": 4, "pixelsplat": 4, "noposplat": 4, "depthsplat": 2}
#: Gaussians per pixel in a non-deterministic forward (pixelSplat samples 3 depths per ray).
GAUSSIANS_PER_PIXEL = {"pixelsplat": 3}
#: The encoder's input-most tensor: a non-zero gradient there means the photometric loss reached
#: through the whole network.
INPUT_TENSOR = {"mvsplat": "backbone.backbone.conv1.weight", "noposplat": "backbone.patch_embed.proj.weight",
                "pixelsplat": "backbone.model.conv1.weight", "depthsplat": "depth_predictor.backbone.conv1.weight"}
#: The only upstream tensors allowed a zero gradient after one step from random weights, and why.
#: Anything else without a gradient means a branch of the Gaussians lost its path to the loss.
ZERO_GRAD_ALLOWED = {
    # The ldm UNet refiners end in a zero_module conv: nothing behind it gets a gradient yet.
    "mvsplat": ("depth_predictor.refine_unet.3.", "depth_predictor.corr_refine_net.3."),
    # The regressor's UNet ends in a zero_module conv (so the conv + norm in front of it get none
    # either), and the DPT upsampler's output conv is zero-initialized ("init delta depth as zero").
    "depthsplat": ("depth_predictor.regressor.", "depth_predictor.upsampler."),
    # CroCo's mask token (masked pretraining only) and the DPT heads' refinenet4.resConfUnit1,
    # which the deepest fusion block never calls (it has no skip input).
    "noposplat": ("backbone.mask_token", "downstream_head1.dpt.scratch.refinenet4.resConfUnit1.",
                  "downstream_head2.dpt.scratch.refinenet4.resConfUnit1.",
                  "gaussian_param_head.dpt.scratch.refinenet4.resConfUnit1.",
                  "gaussian_param_head2.dpt.scratch.refinenet4.resConfUnit1."),
    # The ResNet backbone's classifier, unused for features.
    "pixelsplat": ("backbone.model.fc.",),
}


#: How each repo is composed in-process for the contract test (CPU, random weights, no download).
SPECS = {
    "mvsplat": {"dataset": "dataset", "image_shape_key": "image_shape",
                "view_sampler": "dataset/view_sampler=evaluation",
                "extra": ["model.encoder.unimatch_weights_path=null"]},
    "pixelsplat": {"dataset": "dataset", "image_shape_key": "image_shape",
                   "view_sampler": "dataset/view_sampler=evaluation", "extra": ["model/encoder/backbone=resnet"]},
    "depthsplat": {"dataset": "dataset", "image_shape_key": "image_shape",
                   "view_sampler": "dataset/view_sampler=evaluation",
                   "extra": ["model.encoder.unimatch_weights_path=null"]},
    "noposplat": {"dataset": "dataset.re10k", "image_shape_key": "input_image_shape",
                  "view_sampler": "dataset/view_sampler@dataset.re10k.view_sampler=evaluation", "extra": []},
}


def _purge_src() -> None:
    """Both upstream repos are the package ``src``: never keep two in one process."""
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[name]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def upstream(request):
    _, repo, var, case_overrides = request.param
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} is not set")
    if not DATA.is_dir():
        pytest.skip(f"{DATA} not found")
    from diff3r_plugin.integration.compose import compose_upstream_config
    from diff3r_plugin.integration.cpu_run import install_import_stubs
    from diff3r_plugin.integration.offline_hub import OfflineHubError, offline_torch_hub

    install_import_stubs()
    _purge_src()
    sys.path.insert(0, str(Path(path).resolve()))
    try:
        spec = SPECS[repo]
        ds = spec["dataset"]
        cfg = compose_upstream_config(path, [
            "+experiment=re10k", "+optimizer=diff3r", "mode=test", "wandb.mode=disabled",
            f"{ds}.roots=[{DATA}]", f"{ds}.{spec['image_shape_key']}=[64,64]", spec["view_sampler"],
            f"{ds}.view_sampler.index_path={DATA}/evaluation_index_2ctx.json", *spec["extra"],
            *case_overrides, "diff3r.steps=1", "diff3r.inner_solver=adam", "diff3r.pcg_maxiter=5"])
        from src.config import load_typed_root_config
        from src.dataset import get_dataset
        from src.global_cfg import set_cfg
        from src.model.encoder import get_encoder

        set_cfg(cfg)
        typed = load_typed_root_config(cfg)
        torch.manual_seed(0)
        try:
            with offline_torch_hub():  # nothing is downloaded; random weights
                encoder, _ = get_encoder(typed.model.encoder)
        except OfflineHubError as error:
            pytest.skip(str(error))
        dataset = get_dataset(typed.dataset, "test", None)
        datasets = dataset if isinstance(dataset, list) else [dataset]
        example = next(iter(datasets[0]))
        yield repo, cfg, encoder, example
    finally:
        sys.path.remove(str(Path(path).resolve()))
        _purge_src()


def _encoder_args(repo: str, context: dict) -> tuple:
    """The positional call ModelWrapper.training_step makes (NoPoSplat has no ``deterministic``)."""
    return (context, 0) if repo == "noposplat" else (context, 0, False)


def _gaussians(repo: str, out, types):
    """The upstream Gaussians of an encoder output (DepthSplat: its dict, checked here)."""
    if repo == "depthsplat":
        assert isinstance(out, dict) and set(out) == {"gaussians", "depths"}  # return_depth: true
        out = out["gaussians"]
    assert type(out) is types.Gaussians
    return out


def test_real_upstream_contract(upstream):
    from torch.utils.data import default_collate

    from diff3r_plugin.integration.cpu_run import TorchDecoder
    from diff3r_plugin.integration.hydra_callback import wrap_from_hydra

    repo, cfg, encoder, example = upstream
    import src.model.types as types

    if repo == "noposplat":
        # Random NoPoSplat weights put every point in front of the near-plane cull (nothing
        # renders, no photometric gradient); start the untrained points 2 units ahead instead.
        from diff3r_plugin.adapters.noposplat import init_point_depth

        init_point_depth(encoder, 2.0)
    keys = list(encoder.state_dict().keys())
    checkpoint = {k: v.clone() for k, v in encoder.state_dict().items()}
    shim_fn = type(encoder).get_data_shim
    wrap_from_hydra(cfg, encoder)
    assert encoder.diff3r.adapter.name == repo  # auto-detected from the class name
    assert encoder.diff3r.adapter.encoder_sh_degree(encoder) == SH_DEGREE[repo]
    assert list(encoder.state_dict().keys()) == keys
    encoder.load_state_dict(checkpoint, strict=True)
    assert type(encoder).get_data_shim is shim_fn
    from src.dataset.data_module import get_data_shim

    batch = get_data_shim(encoder)(default_collate([example]))
    if repo == "noposplat":
        assert float(batch["context"]["image"].min()) < 0  # the normalize shim ran
    b, v, _, h, w = batch["context"]["image"].shape
    encoder.train()
    args = _encoder_args(repo, batch["context"])
    out = encoder(*args)
    gaussians = _gaussians(repo, out, types)
    assert encoder.diff3r.calls == 1
    # Every prediction the encoder returned is kept (DepthSplat multi-scale: b * K rows).
    k = 1 if repo != "depthsplat" else 1 + (encoder.cfg.num_scales > 1)
    g = v * h * w * GAUSSIANS_PER_PIXEL.get(repo, 1)
    assert tuple(gaussians.means.shape) == (b * k, g, 3)
    assert tuple(gaussians.covariances.shape) == (b * k, g, 3, 3)
    assert tuple(gaussians.harmonics.shape) == (b * k, g, 3, (SH_DEGREE[repo] + 1) ** 2)
    assert tuple(gaussians.opacities.shape) == (b * k, g)
    if repo == "depthsplat":
        assert tuple(out["depths"].shape) == (b * k, v, h, w)
    decoder = TorchDecoder(sh_basis=encoder.diff3r.adapter.sh_basis)
    t = batch["target"]
    if k > 1:  # render every prediction, as DepthSplat's training_step does
        t = {key: torch.cat([t[key]] * k) for key in ("extrinsics", "intrinsics", "near", "far", "image")}
    color = decoder(gaussians, t["extrinsics"], t["intrinsics"], t["near"], t["far"], (h, w)).color
    loss = ((color - t["image"]) ** 2).mean()
    assert torch.isfinite(loss)
    loss.backward()
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    grads = [p.grad for _, p in named if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # The photometric loss reaches the input layer, every encoder tensor except those listed
    # (with the upstream reason) in ZERO_GRAD_ALLOWED, and the uncertainty head (Lambda).
    zero = [n for n, p in named if p.grad is None or not bool((p.grad != 0).any())]
    assert INPUT_TENSOR[repo] not in zero and INPUT_TENSOR[repo] in dict(named)
    unexplained = [n for n in zero if not n.startswith(ZERO_GRAD_ALLOWED[repo])]
    assert not unexplained, f"{len(unexplained)} encoder tensors got no gradient: {unexplained[:20]}"
    assert any(p.grad is not None and bool((p.grad != 0).any()) for p in encoder.diff3r_parameters())
    encoder.eval()  # as in ModelWrapper.test_step: eval mode under inference mode
    with torch.inference_mode():
        out = encoder(*args)
    gaussians = _gaussians(repo, out, types)
    assert gaussians.means.shape[0] == b and torch.isfinite(gaussians.means).all()  # eval: final only


def test_offline_torch_hub_builds_from_local_checkout(tmp_path, monkeypatch):
    """GitHub hub loads go to a local checkout with pretrained=False; nothing is downloaded."""
    from diff3r_plugin.integration.offline_hub import OfflineHubError, local_hub_checkout, offline_torch_hub

    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        "dependencies = ['torch']\n"
        "def dinov2_vits14(pretrained=True, **kw):\n"
        "    return {'pretrained': pretrained, **kw}\n")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.delenv("DIFF3R_TORCH_HUB_FACEBOOKRESEARCH_DINOV2", raising=False)
    original = torch.hub.load
    with offline_torch_hub():
        with pytest.raises(OfflineHubError, match="DIFF3R_TORCH_HUB_FACEBOOKRESEARCH_DINOV2"):
            torch.hub.load("facebookresearch/dinov2", "dinov2_vits14")
        with pytest.raises(OfflineHubError, match="refusing to download"):
            torch.hub.load_state_dict_from_url("https://example.invalid/w.pth")
        monkeypatch.setenv("DIFF3R_TORCH_HUB_FACEBOOKRESEARCH_DINOV2", str(repo))
        assert local_hub_checkout("facebookresearch/dinov2") == repo.resolve()
        assert torch.hub.load("facebookresearch/dinov2", "dinov2_vits14", img_size=518) == \
            {"pretrained": False, "img_size": 518}
    assert torch.hub.load is original
    # The torch hub cache layout (<owner>_<name>_<ref>) is found too.
    monkeypatch.delenv("DIFF3R_TORCH_HUB_FACEBOOKRESEARCH_DINOV2")
    cached = tmp_path / "torch_home" / "hub" / "facebookresearch_dino_main"
    cached.mkdir(parents=True)
    (cached / "hubconf.py").write_text("")
    assert local_hub_checkout("facebookresearch/dino:main") == cached.resolve()


def test_matplotlib_get_cmap_shim():
    """DepthSplat does ``from matplotlib.cm import get_cmap`` (removed in matplotlib 3.9)."""
    pytest.importorskip("matplotlib")
    from diff3r_plugin.integration.cpu_run import install_import_stubs

    install_import_stubs(["matplotlib.cm.get_cmap"])
    import matplotlib
    from matplotlib.cm import get_cmap

    assert get_cmap("turbo").name == matplotlib.colormaps["turbo"].name
    assert get_cmap("viridis", 8).N == 8


@pytest.mark.parametrize("repo, var", [("mvsplat", "DIFF3R_UPSTREAM_MVSPLAT"),
                                       ("noposplat", "DIFF3R_UPSTREAM_NOPOSPLAT"),
                                       ("pixelsplat", "DIFF3R_UPSTREAM_PIXELSPLAT"),
                                       ("depthsplat", "DIFF3R_UPSTREAM_DEPTHSPLAT")])
def test_real_upstream_trains_through_callback(repo, var, tmp_path):
    """``+optimizer=diff3r`` alone: upstream's training loop trains through Diff3R, checkpoints the head."""
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} is not set")
    if repo == "depthsplat" and not os.environ.get("DIFF3R_TORCH_HUB_FACEBOOKRESEARCH_DINOV2"):
        pytest.skip("DepthSplat builds DINOv2 through torch.hub: set DIFF3R_TORCH_HUB_FACEBOOKRESEARCH_DINOV2")
    if not DATA.is_dir():
        pytest.skip(f"{DATA} not found")
    from diff3r_plugin.integration.examples import _train_root, example_overrides, upstream_command

    out = tmp_path / "run"
    diff3r = ["steps=1", "inner_solver=adam", "pcg_maxiter=5"] + (["point_depth_init=2.0"] if repo == "noposplat" else [])
    cmd = upstream_command(example_overrides(repo, _train_root(DATA, tmp_path), 64, 2, diff3r,
                                             [f"hydra.run.dir={out}"]), "cpu")
    proc = subprocess.run(cmd, cwd=path, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "diff3r_report.json").read_text())
    assert report["wrapped"] is True and report["adapter"] == repo
    assert report["head_in_optimizer"] is True and report["head_parameters"] > 0
    assert report["train_steps"] == 2 and report["losses_finite"] and len(report["losses"]) == 2
    assert report["head_digest"] != report["head_digest_initial"]  # the head was trained
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert ckpts, list(out.iterdir())
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("diff3r_head.") for k in state)
    assert any(k.startswith("encoder.") for k in state)
