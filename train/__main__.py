"""Command line: ``python -m train --config FILE [key=value ...] [--resume]``, ``python -m train demo`` or
``python -m train demo-lm``. Ctrl-C (or SIGTERM) ends any of them with one ``interrupted:`` line saying what a
rerun of the same command resumes from, and exit code 130."""
import argparse
import contextlib
import signal
import sys
import threading

from . import config
from .errors import Interrupted, UserError

USAGE = """python -m train --config FILE [key=value ...] [--resume]
       python -m train demo [--help]        (Fashion-MNIST)
       python -m train demo-lm [--help]     (a language model on the Python standard library)
       python -m train teacher-topk --config FILE out_dir=DIR [k=64] [key=value ...]"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with _sigterm_as_ctrl_c():
        try:
            return _command(argv)
        except Interrupted as exc:
            if exc.report:
                print(f"interrupted: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:  # before the command had started its work
            print("interrupted: rerun the same command to resume from the start (this one had saved nothing yet)",
                  file=sys.stderr)
            return Interrupted.exit_code


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM (kill, a job scheduler's stop) ends a command as Ctrl-C does, and for the same rerun."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _command(argv):
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
                    "non-finite loss or gradient; the last good checkpoint is kept, see on_nonfinite); 130 interrupted "
                    "(Ctrl-C or SIGTERM; one 'interrupted:' line says what a rerun resumes from).",
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
