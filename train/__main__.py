"""Command line: ``python -m train --config FILE [key=value ...] [--resume]``, ``python -m train demo`` or
``python -m train demo-lm``."""
import argparse
import sys

from . import config
from .errors import UserError

USAGE = """python -m train --config FILE [key=value ...] [--resume]
       python -m train demo [--help]        (Fashion-MNIST)
       python -m train demo-lm [--help]     (a language model on the Python standard library)
       python -m train teacher-topk --config FILE out_dir=DIR [k=64] [key=value ...]"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["demo"], ["demo-lm"]):
        from . import demo
        return demo.main(argv[1:], argv[0])
    if argv[:1] == ["teacher-topk"]:
        from . import teacher_topk
        return teacher_topk.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m train", usage=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a teacher (loss=ce) or distil a student (loss=kd|ttm|wttm) with ttm_kernels. "
                    "Multi-GPU / multi-node: torchrun --nproc_per_node=N -m train --config FILE. Exit codes: 0 "
                    "done; 2 the input is wrong (one 'error:' line says what to change); 3 training diverged (a "
                    "non-finite loss or gradient; the last good checkpoint is kept, see on_nonfinite).",
        epilog=config.help_text())
    parser.add_argument("--config", help="YAML file of key: value (see below); train/configs/ has examples")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in out_dir from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    args = parser.parse_intermixed_args(argv)  # key=value both before and after --resume
    try:
        from .engine import train
        cfg = config.load(args.config, args.overrides)
        train(cfg, resume=args.resume)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
