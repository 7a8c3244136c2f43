"""Build ``torch.hub`` models offline: from a local checkout, with random weights, never downloading.

DepthSplat's ``MultiViewUniMatch`` calls ``torch.hub.load("facebookresearch/dinov2", ...)`` and
pixelSplat's DINO backbone ``torch.hub.load("facebookresearch/dino:main", ...)`` at construction
(UPSTREAM.md section 7); on a machine without network access that fails. :func:`offline_torch_hub`
routes those calls to a local checkout of the hub repository.
"""

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["OfflineHubError", "local_hub_checkout", "offline_torch_hub"]

log = logging.getLogger(__name__)


class OfflineHubError(RuntimeError):
    """``torch.hub.load`` from GitHub was called under :func:`offline_torch_hub` without a local checkout."""


def _hub_env_var(owner: str, name: str) -> str:
    return "DIFF3R_TORCH_HUB_" + re.sub(r"[^0-9A-Za-z]", "_", f"{owner}_{name}").upper()


def local_hub_checkout(repo: str) -> Optional[Path]:
    """A local checkout (a directory with ``hubconf.py``) of the torch hub repo ``owner/name[:ref]``.

    Looked up, in order, in ``$DIFF3R_TORCH_HUB_<OWNER>_<NAME>`` (e.g.
    ``DIFF3R_TORCH_HUB_FACEBOOKRESEARCH_DINOV2``) and in the torch hub cache
    (``torch.hub.get_dir()/<owner>_<name>_<ref>``, ref ``main``/``master`` when not given),
    which is where an earlier online ``torch.hub.load`` left it. ``None`` when not found.
    """
    owner_name, _, ref = repo.partition(":")
    owner, _, name = owner_name.partition("/")
    candidates = []
    env = os.environ.get(_hub_env_var(owner, name))
    if env:
        candidates.append(Path(env).expanduser())
    hub_dir = Path(torch.hub.get_dir())
    for r in ([ref] if ref else []) + ["main", "master"]:
        candidates.append(hub_dir / f"{owner}_{name}_{r.replace('/', '_')}")
    for path in candidates:
        if (path / "hubconf.py").is_file():
            return path.resolve()
    return None


@contextlib.contextmanager
def offline_torch_hub():
    """Build ``torch.hub`` models from local checkouts with random weights; never download.

    Inside the context, ``torch.hub.load("<owner>/<name>[:ref]", model, ...)`` (the GitHub
    source, as DepthSplat's ``MultiViewUniMatch`` calls ``facebookresearch/dinov2`` and
    pixelSplat's DINO backbone ``facebookresearch/dino:main``) becomes
    ``torch.hub.load(<local checkout>, model, source="local", pretrained=False)``, the checkout
    found by :func:`local_hub_checkout`. The module is the one upstream builds (same class,
    same ``state_dict`` keys), so an upstream checkpoint that contains it (e.g. DepthSplat's
    ``encoder.depth_predictor.pretrained.*``) still loads. ``torch.hub.load_state_dict_from_url``
    raises. Without a checkout :class:`OfflineHubError` is raised (naming the environment
    variable to set). ``source="local"`` calls pass through unchanged.
    """
    original_load = torch.hub.load
    original_from_url = torch.hub.load_state_dict_from_url

    def load(repo_or_dir: str, model: str, *args: Any, source: str = "github", trust_repo: Any = None,
             force_reload: bool = False, verbose: bool = True, skip_validation: bool = False,
             **kwargs: Any) -> Any:
        if source != "github":
            return original_load(repo_or_dir, model, *args, source=source, trust_repo=trust_repo,
                                 force_reload=force_reload, verbose=verbose,
                                 skip_validation=skip_validation, **kwargs)
        local = local_hub_checkout(repo_or_dir)
        if local is None:
            owner, _, name = repo_or_dir.partition(":")[0].partition("/")
            raise OfflineHubError(
                f"torch.hub.load({repo_or_dir!r}, {model!r}) would download code and weights; "
                f"diff3r builds it offline with random weights from a local checkout of "
                f"github.com/{owner}/{name}: set {_hub_env_var(owner, name)}=<checkout> or put it at "
                f"{Path(torch.hub.get_dir()) / (owner + '_' + name + '_main')}")
        kwargs["pretrained"] = False
        log.info("diff3r: torch.hub.load(%r, %r) -> %s (source=local, pretrained=False: random weights)",
                 repo_or_dir, model, local)
        return original_load(str(local), model, *args, source="local", verbose=verbose, **kwargs)

    def load_state_dict_from_url(url: str, *args: Any, **kwargs: Any) -> Any:
        raise OfflineHubError(f"diff3r.offline_torch_hub: refusing to download {url}")

    torch.hub.load = load  # type: ignore[assignment]
    torch.hub.load_state_dict_from_url = load_state_dict_from_url  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.hub.load = original_load  # type: ignore[assignment]
        torch.hub.load_state_dict_from_url = original_from_url  # type: ignore[assignment]
