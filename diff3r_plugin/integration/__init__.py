"""Running Diff3R inside the upstream repositories (MVSplat, pixelSplat, DepthSplat, NoPoSplat).

* :mod:`.hydra_callback`: the Hydra callback that ``+optimizer=diff3r`` registers; it hooks
  upstream's ``ModelWrapper`` (encoder wrapping, head in optimizer and checkpoints, report).
* :mod:`.cpu_run`: ``diff3r cpu-run -m MODULE``: import stubs, CPU accelerator, torch decoder.
* :mod:`.offline_hub`: ``torch.hub`` models from local checkouts, never downloaded.
* :mod:`.compose`: Hydra composition of an upstream config with the plugin's groups.
* :mod:`.examples`: the examples' ``--upstream`` path (the upstream's own ``src.main``).

Submodules are not imported here: ``cpu_run`` also runs as ``python -m`` (DDP ranks).
"""
