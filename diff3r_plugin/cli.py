"""The ``diff3r`` command line: ``diff3r bench render|layer|step``, ``diff3r build-native``,
``diff3r eval``, ``diff3r experiment``, ``diff3r cpu-run -m MODULE [ARGS...]``."""

import argparse
import json
import sys
from typing import List, Optional


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:>28}: {value}")


def _build_native(args) -> dict:
    from .render.native import native_status
    return native_status()


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cpu-run"]:
        # Everything after `-m MODULE` belongs to the module (Hydra overrides, its own flags),
        # so argparse must not see it.
        from .integration.cpu_run import main as cpu_run_main

        return cpu_run_main(argv[1:])
    parser = argparse.ArgumentParser(prog="diff3r", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True)

    from .bench import render_bench
    p_render = bench_sub.add_parser("render", help="renderer speed and agreement with the dense reference")
    render_bench.add_arguments(p_render)
    p_render.add_argument("--json", action="store_true", help="print one JSON object")
    p_render.set_defaults(func=render_bench.run)

    from .bench import step_bench
    p_step = bench_sub.add_parser("step", help="one outer training step with and without the layer, by part")
    step_bench.add_arguments(p_step)
    p_step.add_argument("--json", action="store_true", help="print one JSON object")
    p_step.set_defaults(func=step_bench.run)

    from .bench import layer_bench
    p_layer = bench_sub.add_parser("layer", help="implicit vs unrolled backward of the TTO layer")
    layer_bench.add_arguments(p_layer)
    p_layer.add_argument("--json", action="store_true")
    p_layer.set_defaults(func=layer_bench.run)

    p_native = sub.add_parser("build-native", help="build the compiled CPU renderer kernels now (else on first use)")
    p_native.add_argument("--json", action="store_true")
    p_native.set_defaults(func=_build_native)

    from .evaluation import eval_cli, experiment
    for name, module, help_text in (
        ("eval", eval_cli, "evaluate methods on a dataset"),
        ("experiment", experiment, "train baseline and Diff3R, then evaluate"),
    ):
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        if not any(a.dest == "json" for a in p._actions):
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=module.run)

    sub.add_parser("cpu-run", help="run `python -m MODULE ARGS` of an upstream repo without CUDA",
                   usage="diff3r cpu-run -m MODULE [ARGS...]")
    args = parser.parse_args(argv)
    result = args.func(args)
    _print(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
