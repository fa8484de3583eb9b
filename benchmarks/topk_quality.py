"""Quality of students distilled from a sparse teacher (issue 10): held-out CE per token on the LM corpus.

    python -m benchmarks.topk_quality [--runs DIR] [--no-write]

On the trainer's LM task (train/configs/lm_teacher.yaml, lm_wttm.yaml: byte-level GPTs on this repository's
README.md, frozen into the runs folder, CPU): the gpt_small teacher, its top-k stores for k = 8 and 64
(``python -m train teacher-topk``), then gpt_tiny students with WTTM (gamma 0.8, beta 0.5, the config's) from
the dense teacher, from each store with tail bucket and renormalize, and with CE only. Reported: held-out CE
per token (nats, log of the perplexity) at the last epoch and at the best one. One seed each, on a small
text: differences below the seed-to-seed spread (not measured here) are not evidence.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMMON = ["progress=false", "tensorboard=false"]
STUDENTS = {  # name: extra config overrides, given the runs folder
    "CE only": lambda runs: ["loss=ce"],
    "dense teacher": lambda runs: [],
    **{f"top-{k} {tail}": (lambda runs, k=k, tail=tail: [f"teacher_topk={runs}/store-k{k}", f"topk_tail={tail}"])
       for k in (8, 64) for tail in ("bucket", "renormalize")},
}


def run(runs, epochs, log=print):
    sys.path.insert(0, ROOT)
    from train.__main__ import main as train

    # A frozen copy of the corpus: the README changes, and a store is refused for another corpus.
    corpus = os.path.join(runs, "corpus.md")
    if not os.path.exists(corpus):
        os.makedirs(runs, exist_ok=True)
        shutil.copyfile(os.path.join(ROOT, "README.md"), corpus)
    common = [f"data_dir={corpus}", *COMMON]
    teacher = os.path.join(runs, "teacher", "checkpoint_last.pt")
    if not os.path.exists(teacher):
        assert train(["--config", "train/configs/lm_teacher.yaml", f"out_dir={runs}/teacher", *common]) == 0
    student = ["--config", "train/configs/lm_wttm.yaml", f"teacher_checkpoint={teacher}", f"epochs={epochs}", *common]
    for k in (8, 64):
        assert train(["teacher-topk", *student, f"out_dir={runs}/store-k{k}", f"k={k}"]) == 0
    rows = {}
    for name, extra in STUDENTS.items():
        out = os.path.join(runs, name.replace(" ", "-"))
        if not os.path.exists(os.path.join(out, "summary.json")):
            assert train([*student, f"out_dir={out}", *extra(runs)]) == 0
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        rows[name] = (math.log(summary["last_ppl"]), math.log(summary["best_ppl"]))
        log(f"{name}: {rows[name]}")
    with open(os.path.join(runs, "teacher", "summary.json")) as f:
        summary = json.load(f)
    rows["(the teacher, gpt_small)"] = (math.log(summary["last_ppl"]), math.log(summary["best_ppl"]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/topk-quality", help="folder of the runs (reused when present)")
    parser.add_argument("--epochs", type=int, default=30, help="the students' epochs (lm_wttm.yaml: 30)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    rows = run(args.runs, args.epochs)
    command = "python -m benchmarks.topk_quality " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["### Quality - students distilled from top-k stores (LM task, CPU)", "",
             f"Command: `{command.strip()}`. gpt_tiny students ({args.epochs} epochs, WTTM gamma 0.8, beta 0.5 from "
             "train/configs/lm_wttm.yaml) of the gpt_small teacher of train/configs/lm_teacher.yaml, byte-level "
             "(V = 257) on this repository's README.md (a copy in the runs folder); held-out CE per token in nats "
             "(log perplexity). One seed per row on a small text, and no seed-to-seed spread measured: small "
             "differences are not evidence.", "",
             "| student | CE last epoch | CE best epoch |", "|---|---|---|"]
    lines += [f"| {name} | {last:.3f} | {best:.3f} |" for name, (last, best) in rows.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        sys.path.insert(0, HERE)
        from benchmarks.linear_bench import write_results
        from benchmarks.topk_storage import INTRO, SECTION

        write_results(os.path.join(HERE, "RESULTS.md"), "quality", table, SECTION, INTRO)


if __name__ == "__main__":
    main()
