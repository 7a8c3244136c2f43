import pytest
import torch

from diff3r_plugin.data.embedded import EmbeddedDataset
from diff3r_plugin.models import TinyPoseGivenEncoder
from diff3r_plugin.training import forward_model, train, training_step, tto_config
from diff3r_plugin.uncertainty import UncertaintyHead


def _setup():
    torch.manual_seed(0)
    ds = EmbeddedDataset(1, image_shape=(16, 16))
    batch = ds[0]
    enc = TinyPoseGivenEncoder(width=8, num_depths=8)
    head = UncertaintyHead(enc.num_features, 0)
    return batch, enc, head


def test_head_gets_gradient_through_layer_and_lambda_changes():
    batch, enc, head = _setup()
    cfg = tto_config(3, pcg_maxiter=5, precond_probes=1)
    loss, log = training_step(enc, head, batch, method="diff3r", config=cfg, lpips_weight=0)
    loss.backward()
    assert head.out.bias.grad is not None and float(head.out.bias.grad.abs().sum()) > 0
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in enc.parameters())
    with torch.no_grad():
        lam0 = forward_model(enc, head, batch, tto=False, config=cfg).lam.clone()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    opt.step()
    with torch.no_grad():
        lam1 = forward_model(enc, head, batch, tto=False, config=cfg).lam
    assert not torch.allclose(lam0, lam1)


def test_short_diff3r_training_lowers_outer_loss():
    batch, enc, head = _setup()
    cfg = tto_config(2, pcg_maxiter=4, precond_probes=1)
    with torch.no_grad():
        before, _ = training_step(enc, head, batch, method="diff3r", config=cfg, lpips_weight=0)
    res = train(enc, head, [batch], 6, method="diff3r", config=cfg, lr=3e-3, head_lr=1e-2,
                progress=False, lpips_weight=0)
    assert len(res.losses) == 6 and all(torch.isfinite(torch.tensor(res.losses)))
    with torch.no_grad():
        after, _ = training_step(enc, head, batch, method="diff3r", config=cfg, lpips_weight=0)
    assert float(after) < float(before)


def test_baseline_mode_trains_without_layer():
    batch, enc, _ = _setup()
    cfg = tto_config(2)
    with torch.no_grad():
        before, log = training_step(enc, None, batch, method="baseline", config=cfg, lpips_weight=0)
    assert "stationarity" not in log
    res = train(enc, None, [batch], 8, method="baseline", config=cfg, lr=3e-3, progress=False,
                lpips_weight=0)
    with torch.no_grad():
        after, _ = training_step(enc, None, batch, method="baseline", config=cfg, lpips_weight=0)
    assert float(after) < float(before) and len(res.losses) == 8


def test_capped_pcg_is_summarized_once_per_run_not_warned_per_step(caplog, recwarn):
    batch, enc, head = _setup()
    cfg = tto_config(2, pcg_maxiter=2, precond_probes=1)  # far too few iterations to converge
    with caplog.at_level("INFO", logger="diff3r_plugin.training"):
        res = train(enc, head, [batch], 3, method="diff3r", config=cfg, progress=False, lpips_weight=0)
    assert not [w for w in recwarn if "PCG did not converge" in str(w.message)]
    assert res.pcg.steps == 3 and res.pcg.capped == 3
    assert res.pcg.worst_rel_residual > cfg.pcg_tol
    assert max(l["pcg_rel_residual"] for l in res.logs) == res.pcg.worst_rel_residual
    lines = [r.getMessage() for r in caplog.records if "PCG stopped at its cap" in r.getMessage()]
    assert len(lines) == 1 and "3 of 3 steps" in lines[0] and f"{res.pcg.worst_rel_residual:.2e}" in lines[0]


def test_capped_pcg_still_warns_when_convergence_was_asked_for():
    batch, enc, head = _setup()
    cfg = tto_config(2, pcg_maxiter=2, precond_probes=1, on_failure="warn")
    with pytest.warns(RuntimeWarning, match="PCG did not converge"):
        res = train(enc, head, [batch], 1, method="diff3r", config=cfg, progress=False, lpips_weight=0)
    assert res.pcg.capped == 1


def test_baseline_run_has_no_pcg_summary(caplog):
    batch, enc, _ = _setup()
    with caplog.at_level("INFO", logger="diff3r_plugin.training"):
        res = train(enc, None, [batch], 1, method="baseline", config=tto_config(2), progress=False,
                    lpips_weight=0)
    assert res.pcg.steps == 0 and not caplog.records


def test_init_weight_adds_the_initialization_loss():
    """``init_weight`` beta: the outer loss is L(theta*) + beta L(theta0), where L(theta0) is the
    zero-shot (baseline) loss of the same batch; the extra gradient reaches the encoder."""
    batch, enc, head = _setup()
    cfg = tto_config(2, pcg_maxiter=4, precond_probes=1)
    with torch.no_grad():
        plain, _ = training_step(enc, head, batch, method="diff3r", config=cfg, lpips_weight=0)
        mixed, log = training_step(enc, head, batch, method="diff3r", config=cfg, lpips_weight=0,
                                   init_weight=0.5)
        zero_shot, _ = training_step(enc, None, batch, method="baseline", config=cfg, lpips_weight=0)
    assert log["init_mse"] == pytest.approx(float(zero_shot), rel=1e-6)
    assert float(mixed) == pytest.approx(float(plain) + 0.5 * float(zero_shot), rel=1e-5)
    assert float(zero_shot) > 0
    with pytest.raises(ValueError, match="init_weight"):
        train(enc, head, [batch], 1, method="diff3r", config=cfg, progress=False, init_weight=-1.0)
