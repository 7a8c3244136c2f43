"""The adapter contract against real upstream checkouts (skipped unless they are given).

Set ``DIFF3R_UPSTREAM_MVSPLAT`` / ``DIFF3R_UPSTREAM_NOPOSPLAT`` to a donydchen/mvsplat or
cvg/NoPoSplat checkout (their Python deps installed: dacite, e3nn, pytorch_lightning, wandb,
colorama, colorspacious, opencv, scikit-video, ...). The CUDA rasterizer and moviepy imports are
stubbed, weights are random, images are 64x64 from ``DIFF3R_TEST_RE10K`` (default: the shared
padded RE10K demo chunk), the TTO is cheap (1 Adam step).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

DATA = Path(os.environ.get("DIFF3R_TEST_RE10K", str(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "re10k_demo_padded360x640")))
CASES = [("mvsplat", "DIFF3R_UPSTREAM_MVSPLAT"), ("noposplat", "DIFF3R_UPSTREAM_NOPOSPLAT")]


def _purge_src() -> None:
    """Both upstream repos are the package ``src``: never keep two in one process."""
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[name]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def upstream(request):
    repo, var = request.param
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} is not set")
    if not DATA.is_dir():
        pytest.skip(f"{DATA} not found")
    from diff3r_plugin.integration.upstream import (UPSTREAM_SPECS, compose_upstream_config,
                                                    install_import_stubs)

    install_import_stubs()
    _purge_src()
    sys.path.insert(0, str(Path(path).resolve()))
    try:
        spec = UPSTREAM_SPECS[repo]
        ds = spec["dataset"]
        cfg = compose_upstream_config(path, [
            "+experiment=re10k", "+optimizer=diff3r", "mode=test", "wandb.mode=disabled",
            f"{ds}.roots=[{DATA}]", f"{ds}.{spec['image_shape_key']}=[64,64]", spec["view_sampler"],
            f"{ds}.view_sampler.index_path={DATA}/evaluation_index_2ctx.json", *spec["extra"],
            "diff3r.steps=1", "diff3r.inner_solver=adam", "diff3r.pcg_maxiter=5"])
        from src.config import load_typed_root_config
        from src.dataset import get_dataset
        from src.global_cfg import set_cfg
        from src.model.encoder import get_encoder

        set_cfg(cfg)
        typed = load_typed_root_config(cfg)
        torch.manual_seed(0)
        encoder, _ = get_encoder(typed.model.encoder)
        dataset = get_dataset(typed.dataset, "test", None)
        datasets = dataset if isinstance(dataset, list) else [dataset]
        example = next(iter(datasets[0]))
        yield repo, cfg, encoder, example
    finally:
        sys.path.remove(str(Path(path).resolve()))
        _purge_src()


def test_real_upstream_contract(upstream):
    from torch.utils.data import default_collate

    from diff3r_plugin.integration.upstream import TorchDecoder, wrap_from_hydra

    repo, cfg, encoder, example = upstream
    import src.model.types as types

    keys = list(encoder.state_dict().keys())
    checkpoint = {k: v.clone() for k, v in encoder.state_dict().items()}
    shim_fn = type(encoder).get_data_shim
    wrap_from_hydra(cfg, encoder)
    assert encoder.diff3r.adapter.name == repo  # auto-detected from the class name
    assert list(encoder.state_dict().keys()) == keys
    encoder.load_state_dict(checkpoint, strict=True)
    assert type(encoder).get_data_shim is shim_fn
    from src.dataset.data_module import get_data_shim

    batch = get_data_shim(encoder)(default_collate([example]))
    if repo == "noposplat":
        assert float(batch["context"]["image"].min()) < 0  # the normalize shim ran
    encoder.train()
    args = (batch["context"], 0, False) if repo == "mvsplat" else (batch["context"], 0)
    gaussians = encoder(*args)
    assert type(gaussians) is types.Gaussians
    decoder = TorchDecoder(sh_basis=encoder.diff3r.adapter.sh_basis)
    t = batch["target"]
    color = decoder(gaussians, t["extrinsics"], t["intrinsics"], t["near"], t["far"], (64, 64)).color
    loss = ((color - t["image"]) ** 2).mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(p.grad is not None for p in encoder.diff3r_parameters())
    with torch.inference_mode():
        out = encoder(*args)
    assert type(out) is types.Gaussians and torch.isfinite(out.means).all()
