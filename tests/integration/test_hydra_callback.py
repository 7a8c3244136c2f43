"""The Hydra callback in process: what it checks at job start, and what it does to a module."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))  # the shared stand-ins
import upstream_fixtures as uf  # noqa: E402
from diff3r_plugin.errors import ConfigError, IntegrationError, UnknownAdapterError
from diff3r_plugin.integration import hydra_callback as hc

CHEAP = {"steps": 1, "inner_solver": "adam", "pcg_maxiter": 5}


class Wrapper(nn.Module):
    """Stands in for upstream's ModelWrapper (a LightningModule with ``self.encoder``)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.other = nn.Linear(2, 2)

    def configure_optimizers(self):
        new = [p for n, p in self.named_parameters() if n.startswith("other")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("other")]
        return torch.optim.Adam([{"params": new, "lr": 1e-3}, {"params": rest, "lr": 1e-4}])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        return None

    def on_save_checkpoint(self, checkpoint):
        return None


PATH = f"{__name__}.Wrapper"


@pytest.fixture
def hooked():
    runs = []

    def hook(diff3r, **cfg):
        run = hc.hook_model_wrapper({"diff3r": dict(CHEAP, **diff3r), **cfg}, PATH, None)
        runs.append(run)
        return run
    yield hook
    for run in runs:
        if run is not None:
            run.uninstall()
    assert "__init__" in Wrapper.__dict__ and not hasattr(Wrapper, "_diff3r_hooked")


def test_hook_wraps_registers_head_and_places_it_in_the_new_group(hooked):
    run = hooked({})
    module = Wrapper(uf.build("mvsplat"))
    assert hasattr(module.encoder, "diff3r") and isinstance(module.diff3r_head, nn.Module)
    assert list(module.encoder.state_dict()) == list(uf.build("mvsplat").state_dict())
    assert {k.split(".")[0] for k in module.state_dict()} == {"encoder", "other", "diff3r_head"}
    opt = module.configure_optimizers()
    head = {id(p) for p in module.diff3r_head.parameters()}
    groups = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert head <= groups[0] and not head & groups[1]  # the lr=1e-3 group, once
    report = run.report(module)
    assert report["head_in_optimizer"] and report["head_lr"] == 1e-3 and report["wrapped"]
    # Strict loading of a checkpoint without head keys keeps the fresh head; the caller's dict is untouched.
    sd = {k: v.clone() for k, v in module.state_dict().items() if not k.startswith("diff3r_head.")}
    before = {k: v.clone() for k, v in module.diff3r_head.state_dict().items()}
    module.load_state_dict(sd, strict=True)
    assert not any(k.startswith("diff3r_head.") for k in sd)
    assert run.record["loaded_checkpoint_had_head"] is False
    for k, v in module.diff3r_head.state_dict().items():
        torch.testing.assert_close(v, before[k])
    module.load_state_dict(module.state_dict(), strict=True)
    assert run.record["loaded_checkpoint_had_head"] is True


def test_disabled_leaves_the_module_as_upstream_built_it(hooked):
    hooked({"enabled": False})
    module = Wrapper(uf.build("mvsplat"))
    assert not hasattr(module.encoder, "diff3r") and not hasattr(module, "diff3r_head")
    assert len(module.configure_optimizers().param_groups[0]["params"]) == 2


def test_job_start_errors(hooked, monkeypatch):
    with pytest.raises(UnknownAdapterError, match="Unknown adapter 'foosplat'"):
        hooked({"adapter": "foosplat"})
    with pytest.raises(ConfigError, match=r"refused together with a checkpoint \(checkpointing\.load"):
        hooked({"point_depth_init": 2.0}, checkpointing={"load": "x.ckpt"})
    with pytest.raises(IntegrationError, match=r"cannot import 'nowhere\.model_wrapper'"):
        hc.hook_model_wrapper({"diff3r": CHEAP}, "nowhere.model_wrapper.ModelWrapper")
    with pytest.raises(IntegrationError, match="has no class 'Nope'"):
        hc.hook_model_wrapper({"diff3r": CHEAP}, f"{__name__}.Nope")
    assert hc.hook_model_wrapper({"optimizer": {"lr": 1.0}}, PATH) is None  # plugin not selected
    import hydra

    monkeypatch.setattr(hydra, "__version__", "1.2.0")
    with pytest.raises(IntegrationError, match=r"hydra-core 1\.2 is too old.*>= 1\.3"):
        hc.Diff3RCallback(PATH).start({"diff3r": CHEAP})
    # Hydra turns a callback's Exception into a warning; the callback ends the job instead.
    with pytest.raises(SystemExit) as info:
        hc.Diff3RCallback(PATH).on_job_start({"diff3r": CHEAP})
    assert info.value.code == 2 and isinstance(info.value.error, IntegrationError)
    assert not isinstance(info.value, Exception)


def test_unrecognized_encoder_is_an_error_not_an_unwrapped_run(hooked):
    hooked({})

    class EncoderMystery(nn.Linear):
        pass

    with pytest.raises(UnknownAdapterError, match="Could not detect a diff3r adapter for encoder class 'EncoderMystery'"):
        Wrapper(EncoderMystery(2, 2))
    with pytest.raises(IntegrationError, match="has no 'encoder' module attribute"):
        Wrapper(None)
