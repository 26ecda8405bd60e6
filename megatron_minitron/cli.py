"""`minitron <verb>`: parse the command line and call the verb's stage function (the table is
in commands.py; settings flags are generated from their dataclasses, options.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from megatron_minitron.commands import add_verbs
from megatron_minitron.config import ConfigError, TrainingError
from megatron_minitron.runtime import cpu_compat, interrupt

log = logging.getLogger("minitron")


def cmd_run(a) -> None:
    from megatron_minitron.pipeline.config import load_config
    from megatron_minitron.pipeline.run import run_pipeline

    run_pipeline(load_config(Path(a.config)), a.dry_run, a.world_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minitron", description="Minitron pruning and distillation "
                                "for Megatron-Core models (`minitron VERB --help` for a verb)")
    p.add_argument("-v", "--verbose", "--debug", action="store_true",
                   help="debug logging, including the full cause of a failed load")
    sub = p.add_subparsers(dest="verb", required=True)
    add_verbs(sub)
    rn = sub.add_parser("run", help="the whole pipeline from a YAML config, stages cached")
    rn.add_argument("config", help="YAML file (see configs/)")
    rn.add_argument("--dry-run", action="store_true",
                    help="validate, print the shapes, parameter counts and commands; run nothing")
    rn.add_argument("--world-size", type=int,
                    help="with --dry-run: the number of processes to plan for (default: tp*pp)")
    rn.set_defaults(call=cmd_run)
    return p


def _quiet_third_party() -> None:
    # Megatron warns about apex, TE and deprecated flags on every import: noise for our users.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("megatron", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[minitron] %(message)s")
    _quiet_third_party()
    interrupt.install()
    cpu_compat.import_megatron()
    try:
        args.call(args)
    except (ConfigError, TrainingError) as e:  # exit 2: bad usage or input; 3: training failed
        print(f"minitron {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except interrupt.Preempted as e:
        print(f"minitron {args.verb}: preempted; {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, nothing half-done stays
        print(f"minitron {args.verb}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    finally:
        from megatron_minitron.runtime.distributed import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
