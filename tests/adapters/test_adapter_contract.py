"""Contract tests of the upstream adapters against small upstream-shaped fixtures."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from jaxtyping import TypeCheckError

import upstream_fixtures as uf
from diff3r_plugin.adapters import (Adapter, available_adapters, detect_adapter, get_adapter,
                                    unwrap_encoder)
from diff3r_plugin.config import Diff3RConfig
from diff3r_plugin.errors import ConfigError, ShapeError, UnknownAdapterError
from diff3r_plugin.uncertainty import UncertaintyHead

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")

NAMES = ["mvsplat", "pixelsplat", "depthsplat", "noposplat"]
FAST = Diff3RConfig(steps=1, inner_solver="adam", pcg_maxiter=8, lambda_mode="constant")


def _gauss(out):
    return out["gaussians"] if isinstance(out, dict) else out


def _wrapped(name, config=FAST, head=None, **kw):
    enc = uf.build(name, **kw)
    get_adapter(name)().wrap_encoder(enc, config, head=head)
    return enc


def test_builtin_adapters_registered():
    assert set(NAMES) <= set(available_adapters())
    for name in NAMES:
        cls = get_adapter(name)
        assert issubclass(cls, Adapter) and cls.name == name
    assert get_adapter("noposplat").pose_free and get_adapter("noposplat").sh_basis == "3dgs"
    assert not get_adapter("mvsplat").pose_free and get_adapter("mvsplat").sh_basis == "e3nn"


@pytest.mark.parametrize("name", NAMES)
def test_auto_detect_from_class_name(name):
    assert detect_adapter(uf.build(name)) == name


def test_unknown_adapter_lists_known_names():
    with pytest.raises(UnknownAdapterError) as info:
        get_adapter("foosplat")
    msg = str(info.value)
    for name in NAMES:
        assert name in msg
    with pytest.raises(UnknownAdapterError, match="mvsplat"):
        detect_adapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_unchanged_and_strict_roundtrip(name):
    plain = uf.build(name, seed=1)
    checkpoint = {k: v.clone() for k, v in plain.state_dict().items()}  # an "upstream checkpoint"
    enc = uf.build(name, seed=2)
    keys = list(enc.state_dict().keys())
    params = [n for n, _ in enc.named_parameters()]
    head = torch.nn.Linear(3, 3)
    get_adapter(name)().wrap_encoder(enc, FAST, head=head)
    assert list(enc.state_dict().keys()) == keys
    assert [n for n, _ in enc.named_parameters()] == params
    enc.load_state_dict(checkpoint, strict=True)  # no missing head keys
    for k, v in enc.state_dict().items():
        assert torch.equal(v, checkpoint[k])
    uf.build(name).load_state_dict(enc.state_dict(), strict=True)  # and back
    # The head lives outside the encoder's module tree.
    assert enc.diff3r_head is head
    assert [id(p) for p in enc.diff3r_parameters()] == [id(p) for p in head.parameters()]
    assert set(enc.diff3r_state_dict()) == {"weight", "bias"}
    assert "diff3r" not in " ".join(enc.state_dict())
    assert "kept OUT" in str(enc.diff3r.report) and enc.diff3r.report.state_dict_keys == len(keys)


def test_args_kwargs_pass_through_and_data_shim():
    enc = _wrapped("mvsplat")
    shim_before = type(enc).get_data_shim
    ctx = uf.context_for("mvsplat")
    dump = {}
    out = enc(ctx, 7, deterministic=True, visualization_dump=dump, scene_names=["s"])
    assert enc.calls[-1] == dict(global_step=7, deterministic=True, visualization_dump=dump,
                                 scene_names=["s"])
    assert dump == {"depth": "filled"} and isinstance(out, uf.Gaussians)
    enc(context=ctx, global_step=3)
    assert enc.calls[-1]["global_step"] == 3
    assert type(enc).get_data_shim is shim_before
    assert enc.get_data_shim()({"context": ctx})["shim_applied"] == "EncoderCostVolume"
    with pytest.raises(ConfigError, match="already wrapped"):
        get_adapter("mvsplat")().wrap_encoder(enc, FAST)
    unwrap_encoder(enc)
    assert isinstance(enc(ctx, 0), uf.Gaussians) and not hasattr(enc, "diff3r")


@pytest.mark.parametrize("name", NAMES)
def test_returns_upstream_class_and_tto_changes_it(name):
    enc = _wrapped(name)
    ctx = uf.context_for(name)
    with torch.no_grad():
        out = _gauss(enc(ctx, *uf.call_args(name)))
        ref = _gauss(enc.diff3r.original_forward(ctx, *uf.call_args(name)))
    assert type(out) is uf.Gaussians
    uf.decode(out)  # accepted by the jaxtyped consumer
    # A look-alike with the same fields is refused by the type-checked consumer.
    with pytest.raises(TypeCheckError, match="gaussians"):
        uf.decode(SimpleNamespace(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)}))
    assert out.means.shape == ref.means.shape and out.harmonics.shape == ref.harmonics.shape
    assert all(torch.isfinite(getattr(out, f)).all() for f in ("means", "covariances", "harmonics", "opacities"))
    assert not torch.allclose(out.harmonics, ref.harmonics)  # the TTO did something
    info = enc.diff3r.last_info
    assert torch.isfinite(info.final_energy).all() and int(info.inner_steps.sum()) == 1


def test_degree4_sh_untouched():
    enc = _wrapped("mvsplat", config=dataclasses.replace(FAST, steps=2))
    ctx = uf.context_for("mvsplat")
    with torch.no_grad():
        out = enc(ctx, 0)
        ref = enc.diff3r.original_forward(ctx, 0)
    assert out.harmonics.shape[-1] == 25
    assert torch.equal(out.harmonics[..., 16:], ref.harmonics[..., 16:])
    assert not torch.equal(out.harmonics[..., :16], ref.harmonics[..., :16])


def test_depthsplat_dict_output_and_multiscale_batch():
    enc = _wrapped("depthsplat")
    ctx = uf.context_for("depthsplat")
    with torch.no_grad():
        out = enc(ctx, 0)
    assert set(out) == {"gaussians", "depths"} and out["depths"].shape == (1, 2, 8, 8)
    assert type(out["gaussians"]) is uf.Gaussians and out["gaussians"].harmonics.shape[-1] == 9
    # Training mode, num_scales=2: batch = b * 2 (intermediate rows first, final last).
    enc.train()
    with torch.no_grad():
        out = enc(ctx, 0)["gaussians"]
        ref = enc.diff3r.original_forward(ctx, 0)["gaussians"]
    assert out.means.shape[0] == 2
    assert torch.equal(out.harmonics[0], ref.harmonics[0])  # intermediate passed through
    assert not torch.allclose(out.harmonics[1], ref.harmonics[1])  # final optimized
    each = uf.build("depthsplat")
    get_adapter("depthsplat")(predictions="each").wrap_encoder(each, FAST)
    each.train()
    with torch.no_grad():
        out = each(ctx, 0)["gaussians"]
        ref = each.diff3r.original_forward(ctx, 0)["gaussians"]
    assert not torch.allclose(out.harmonics[0], ref.harmonics[0])
    assert isinstance(each.diff3r.last_info, list) and len(each.diff3r.last_info) == 2


def test_noposplat_unnormalizes_context_images():
    raw = uf.make_context()
    enc = uf.build("noposplat")
    shimmed = enc.get_data_shim()({"context": raw})["context"]
    assert float(shimmed["image"].min()) < 0  # the shim maps to [-1, 1]
    adapter = get_adapter("noposplat")()
    views = adapter.context_views(shimmed)
    torch.testing.assert_close(views.images, raw["image"])
    # Mean/std are read from the encoder config at wrap time.
    enc.cfg.input_mean, enc.cfg.input_std = 0.4, 0.25
    adapter.wrap_encoder(enc, FAST)
    ctx = enc.get_data_shim()({"context": raw})["context"]
    torch.testing.assert_close(adapter.context_views(ctx).images, raw["image"])


def test_noposplat_estimates_and_refines_context_pose():
    """The oracle fixture places view 1's points with the true relative pose: PnP finds it."""
    enc = _wrapped("noposplat")
    raw = uf.make_context()
    ctx = enc.get_data_shim()({"context": raw})["context"]
    with torch.no_grad():
        enc(ctx)
    init = enc.diff3r.last_initial_poses
    rel = torch.linalg.inv(raw["extrinsics"][:, :1]) @ raw["extrinsics"]
    torch.testing.assert_close(init[:, 0], torch.eye(4)[None])
    torch.testing.assert_close(init[:, 1], rel[:, 1], atol=1e-3, rtol=0)
    assert enc.diff3r.last_poses.shape == (1, 2, 4, 4)  # refined by the pose group
    assert enc.diff3r.last_info is not None
    # pose_source="batch" uses the batch extrinsics (with view 0 forced to the identity).
    enc2 = uf.build("noposplat")
    get_adapter("noposplat")(pose_source="batch").wrap_encoder(enc2, FAST)
    with torch.no_grad():
        enc2(ctx)
    torch.testing.assert_close(enc2.diff3r.last_initial_poses[:, 1], ctx["extrinsics"][:, 1])


@pytest.mark.parametrize("name", ["mvsplat", "noposplat"])
def test_tto_inside_inference_mode(name):
    enc = _wrapped(name)
    ctx = uf.context_for(name)
    with torch.inference_mode():
        ctx_inf = {k: v.clone() for k, v in ctx.items()}
        out = enc(ctx_inf, *uf.call_args(name))
        ref = enc.diff3r.original_forward(ctx_inf, *uf.call_args(name))
    assert type(out) is uf.Gaussians and torch.isfinite(out.means).all()
    assert not torch.allclose(out.harmonics, ref.harmonics)


class _StandInHead(torch.nn.Module):
    """Minimal head with the UncertaintyHead interface: features [b, g, F] -> lam [b, n]."""

    def __init__(self, in_features, sh_degree, num_pose_views=0, *, granularity="group", floor=1e-4,
                 init=1.0, hidden=4):
        super().__init__()
        from diff3r_plugin.gaussians.layout import GaussianLayout
        self.layout_of = lambda g: GaussianLayout(g, sh_degree, num_pose_views)
        self.lin = torch.nn.Linear(in_features, 1)
        self.floor = floor

    def forward(self, features):
        b, g = features.shape[:2]
        n = self.layout_of(g).numel
        s = self.lin(features).mean((1, 2))  # [b]
        return self.floor + torch.nn.functional.softplus(s)[:, None].expand(b, n)


def _stand_in_features(params, images=None, extrinsics=None, **kw):
    return torch.cat([params.means, params.opacity_logits[..., None]], -1)


@pytest.mark.parametrize("name", ["mvsplat", "noposplat"])
def test_gradients_reach_encoder_and_head(name, monkeypatch):
    import diff3r_plugin.uncertainty as unc
    monkeypatch.setattr(unc, "features_from_gaussians", _stand_in_features, raising=False)
    monkeypatch.setattr(unc, "UncertaintyHead", _StandInHead, raising=False)
    monkeypatch.setattr(unc, "NUM_GAUSSIAN_FEATURES", 4, raising=False)
    config = dataclasses.replace(FAST, lambda_mode="predicted", steps=2)
    enc = _wrapped(name, config=config)  # head built by the adapter (stand-in class)
    assert isinstance(enc.diff3r_head, _StandInHead)
    ctx = uf.context_for(name)
    out = enc(ctx, *uf.call_args(name))
    loss = (out.harmonics[..., :4] ** 2).sum() + (out.means ** 2).sum() + out.opacities.sum()
    loss.backward()
    enc_grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert enc_grads and all(torch.isfinite(g).all() for g in enc_grads)
    assert sum(float(g.abs().sum()) for g in enc_grads) > 0
    head_grads = [p.grad for p in enc.diff3r_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in head_grads)
    assert sum(float(g.abs().sum()) for g in head_grads) > 0


def test_built_in_uncertainty_head_is_attached_and_trained():
    enc = _wrapped("mvsplat", config=dataclasses.replace(FAST, lambda_mode="predicted"))
    assert isinstance(enc.diff3r_head, UncertaintyHead)
    out = enc(uf.context_for("mvsplat"), 0)
    assert isinstance(enc.diff3r_head, UncertaintyHead)
    out.means.sum().backward()
    grads = [p.grad for p in enc.diff3r_parameters()]
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_missing_context_images_is_a_clear_error():
    enc = _wrapped("mvsplat")
    ctx = uf.context_for("mvsplat")
    adapter = enc.diff3r.adapter
    bad = {k: v for k, v in ctx.items() if k != "image"}
    with pytest.raises(ShapeError, match="no images"):
        adapter.context_views(bad)
    with pytest.raises(ShapeError, match="context batch"):
        adapter.context_views(ctx["image"])
    with pytest.raises(ShapeError, match="lacks"):
        adapter.context_views({k: v for k, v in ctx.items() if k != "near"})


def test_mismatched_view_counts_is_a_clear_error():
    enc = _wrapped("mvsplat")
    ctx = uf.context_for("mvsplat")
    bad = dict(ctx, extrinsics=ctx["extrinsics"][:, :1])
    with pytest.raises(ShapeError, match="view counts must match"):
        enc.diff3r.adapter.context_views(bad)
    # Gaussians for a different number of scenes than the context batch.
    g = enc.diff3r.original_forward(ctx, 0)
    two = uf.context_for("mvsplat", b=2)
    with pytest.raises(ShapeError, match="must match"):
        enc.diff3r.adapter.split_batch(g, enc.diff3r.adapter.context_views(two))
    # NoPoSplat needs pixel-aligned Gaussians for PnP.
    nenc = _wrapped("noposplat")
    nctx = uf.context_for("noposplat")
    ng = nenc.diff3r.original_forward(nctx)
    small = dict(nctx, image=nctx["image"][..., :5, :5])
    with pytest.raises(ShapeError, match="pixel-aligned"):
        nenc.diff3r.adapter.estimate_context_poses(nenc.diff3r.adapter.context_views(small), ng)


def test_disabled_config_passes_output_through():
    enc = _wrapped("mvsplat", config=dataclasses.replace(FAST, enabled=False))
    ctx = uf.context_for("mvsplat")
    with torch.no_grad():
        torch.testing.assert_close(enc(ctx, 0).harmonics, enc.diff3r.original_forward(ctx, 0).harmonics)


def test_predicted_lambda_without_head_is_a_clear_error():
    enc = uf.build("mvsplat")
    adapter = get_adapter("mvsplat")()
    adapter.build_head = lambda encoder, config: None  # e.g. a backbone without a head
    adapter.wrap_encoder(enc, dataclasses.replace(FAST, lambda_mode="predicted"))
    with pytest.raises(ConfigError, match="lambda_mode"):
        enc(uf.context_for("mvsplat"), 0)
