"""``python -m bench perf ...`` (method cost, bench/perf.py), ``python -m bench ops ...`` (fused ops) or
``python -m bench saved ...`` (what the per-sample backward keeps, bench/saved.py) or ``python -m bench adjust ...``
(one per-sample adjustment in sampler calls, bench/adjust.py) or ``python -m bench jacobian ...`` (the
forward-only gradient's direction and cost, bench/jacobian.py)."""

import sys


def main() -> None:
    commands = {"perf": "bench.perf", "ops": "bench.bench_ops", "saved": "bench.saved", "adjust": "bench.adjust",
                "jacobian": "bench.jacobian"}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m bench {{{','.join(commands)}}} [options]  (--help for each)", file=sys.stderr)
        raise SystemExit(2)
    import importlib

    module = importlib.import_module(commands[sys.argv[1]])
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()
