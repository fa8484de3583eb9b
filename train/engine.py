"""The training loop: seeds, precision, DDP, per-epoch evaluation, checkpoints (at the end of every epoch and every
checkpoint_every_min minutes inside one), --resume, time estimates, Ctrl-C and reporting."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint, config, run_lock
from .errors import CheckpointError, ConfigError, Interrupted, UserError
from .eta import FirstSteps, duration
from .logs import RunLog, columns
from .nonfinite import StepGuard
from .parallel import Parallel
from .tasks import get_task, lm_head

SUMMARY_NAME = "summary.json"


# ---------------------------------------------------------------------------------------------------- set-up

class Distributed:
    """Rank, world size and device of this process; torchrun's environment starts a process group (NCCL
    on CUDA, gloo on CPU)."""

    def __init__(self, device_pref: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was requested but CUDA is not available")
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.main = self.rank == 0

    def all_reduce(self, sums: dict) -> dict:
        names = sorted(sums)
        values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in names])
        if self.world > 1:
            dist.all_reduce(values)
        return dict(zip(names, values.tolist()))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a collective: every rank calls it)."""
        if self.world == 1:
            return flag
        return self.all_reduce({"flag": flag})["flag"] > 0

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable, CPU tensors), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        objects = [None] * self.world
        dist.all_gather_object(objects, obj)
        return objects

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int, deterministic: bool):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def autocast_factory(cfg, device):
    amp = cfg["amp"]
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext, amp
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), amp


def build_optimizer(cfg, model):
    # Fused: one kernel per step, and it honours ``found_inf`` on the device, which is how a non-finite step
    # leaves the weights and the optimizer state untouched without a host sync (nonfinite.py).
    if cfg["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                    weight_decay=cfg["weight_decay"], fused=True)
        if cfg["momentum"]:
            # Fused SGD allocates its momentum buffers uninitialised in its first step and fills them in that
            # step's update: a skipped first step would leave garbage. Zeros give the same first update.
            for p in model.parameters():
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                      fused=True)
    epochs, milestones, decay = cfg["epochs"], cfg["lr_milestones"], cfg["lr_decay"]
    if cfg["lr_schedule"] == "multistep":
        # RepDistiller: lr * decay^(number of milestones passed); epoch e (0-based) > milestone - 1.
        def factor(epoch):
            return decay ** sum(epoch >= m for m in milestones)
    else:
        def factor(epoch):
            return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------- loops

def _means(sums: dict, names) -> dict:
    n = sums["n"]
    return {name: (sums[name] / n if name in sums and n else None) for name in names}


def _shown(task, means: dict, names) -> str:
    return "".join(f" {task.format(name, means[name])}" for name in names)


def _rounded(means: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": (None if v is None else round(v, 5)) for k, v in means.items()}


def run_epoch(task, model, teacher, loader, dist_ctx, autocast, *, optimizer=None, scaler=None, guard=None,
              desc="", progress=True, resume=None, after_step=None) -> tuple[dict, float, int]:
    """One pass over ``loader``: training when an optimizer is given (with its GradScaler and StepGuard), else
    evaluation. Returns the metric means (all ranks together, as ``task.finalize`` reports them; the means of
    training leave out the skipped non-finite steps), the wall time and the number of skipped steps.

    Training only: ``resume`` (an InsideEpoch) goes on with an epoch a mid-epoch checkpoint stopped in (``loader``
    yields the batches after its steps); ``after_step(step, sums, seconds, checked)`` is called after each step,
    ``checked`` when the step's loss and flags were just read on the host."""
    training = optimizer is not None
    skipped = 0
    model.train(training)
    first, sums, before = (resume.step, resume.sums, resume.train_time_s) if resume else (0, {}, 0.0)
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, initial=first, leave=False, dynamic_ncols=True,
               disable=not (progress and dist_ctx.main))
    with contextlib.nullcontext() if training else torch.no_grad():
        for step, batch in enumerate(bar, start=first):
            if training:
                guard.before_forward()
                loss, batch_sums = task.train_step(model, teacher, batch, autocast)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(guard.backward_loss(loss)).backward()
                bad = guard.after_backward(loss, step)
                scaler.step(optimizer)
                scaler.update()
                batch_sums = {name: torch.where(bad, 0, value) for name, value in batch_sums.items()}
            else:
                batch_sums = task.eval_step(model, batch, autocast)
            for name, value in batch_sums.items():
                sums[name] = sums.get(name, 0) + (value.detach() if torch.is_tensor(value) else value)
            if training:
                checked = step % guard.log_every == 0
                if checked:  # the only host syncs of the loop
                    bar.set_postfix(loss=f"{guard.check(loss):.4f}")
                if after_step is not None:
                    after_step(step, sums, before + time.perf_counter() - start, checked)
        if training:
            skipped = guard.end_epoch(loss)
    elapsed = before + time.perf_counter() - start
    totals = dist_ctx.all_reduce(sums)
    means = _means(totals, task.train_metrics if training else task.eval_metrics)
    return task.finalize(means, training), elapsed, skipped


# ---------------------------------------------------------------------------------------------------- run

RESUME_KEYS = ("config", "model", "optimizer", "scheduler", "scaler", "rng", "epoch", "best", "history")


def _resume_state(cfg, out_dir):
    path = os.path.join(out_dir, checkpoint.LAST)
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no checkpoint to resume from at {path}")
    state = checkpoint.load(path)
    missing = [k for k in RESUME_KEYS if k not in state] if isinstance(state, dict) else list(RESUME_KEYS)
    if missing or not isinstance(state["config"], dict):
        raise CheckpointError(f"--resume: {path} is not a checkpoint_last.pt of this trainer (it lacks "
                              f"{', '.join(missing or ['a config mapping'])}): resume only the run that wrote it, or "
                              "start a new run in another out_dir")
    # A key the checkpoint lacks was added to the trainer after it was written: it ran with that key's default.
    saved = {k: state["config"].get(k, key.default) for k, key in config.KEYS.items()}
    changed = [k for k in config.KEYS if k not in config.RESUMABLE_CHANGES and saved[k] != cfg[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {cfg[k]!r}" for k in changed)
        raise ConfigError(f"--resume: the config differs from the checkpoint's in {diffs}; resume with the "
                          "same settings (only " + ", ".join(config.RESUMABLE_CHANGES) + " may change)")
    return state


class LastCheckpoint:
    """What checkpoint_last.pt holds, for the messages that point to it: nothing yet, the end of an epoch, or a
    step inside one."""

    def __init__(self, path: str):
        self.path = path
        self.epochs: int | None = None  # epochs done; None: no checkpoint yet
        self.step = self.steps = 0  # in the epoch after them: steps done (0: none) of steps

    def holds(self, epochs: int, step: int = 0, steps: int = 0):
        self.epochs, self.step, self.steps = epochs, step, steps

    def kept(self) -> str | None:
        """The checkpoint and what it holds, for the non-finite guard's messages; None before the first."""
        if self.epochs is None:
            return None
        inside = f", step {self.step} of {self.steps}" if self.step else ""
        return f"{self.path} (epoch {self.epochs + 1 if self.step else self.epochs}{inside})"

    def interrupted(self, resumed: bool, report: bool) -> Interrupted:
        """The Interrupted error of a run stopped now (``resumed``: it was started with --resume)."""
        if self.epochs is None:
            if resumed:  # stopped before it had read the checkpoint it was resuming
                return Interrupted(f"rerun the same command to resume from {self.path}", self.path, report)
            return Interrupted("rerun the same command to resume from the start: no checkpoint was written yet",
                               None, report)
        where = (f"epoch {self.epochs + 1}, step {self.step} of {self.steps}" if self.step
                 else f"the end of epoch {self.epochs}") + f" ({self.path})"
        rerun = "rerun the same command" if resumed else "rerun the same command with --resume"
        return Interrupted(f"{rerun} to resume from {where}", where, report)


class CheckpointClock:
    """When a checkpoint inside an epoch is due: ``minutes`` (checkpoint_every_min; 0 = never) after the last save.
    The ranks decide together, so it is asked only where the loss is read (every log_every steps)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.reset()

    def reset(self):
        self.last = time.monotonic()

    def due(self, dist_ctx) -> bool:
        return bool(self.seconds) and dist_ctx.any(time.monotonic() - self.last >= self.seconds)


class RunEstimate:
    """A run's time estimates. Once, after its first steps: the whole run on this machine (from ``began``, its set-up
    included), as the training steps left at the pace measured plus the evaluations (forward passes only: a third
    of a training step's time per sample). After each epoch: the time left at the pace of the epochs so far,
    evaluations included."""

    def __init__(self, label: str, began: float, train_steps: int, first_epoch_steps: int, eval_steps: float, device,
                 log, on_estimate=None):
        self.label, self.began, self.train_steps, self.eval_steps, self.log, self.on_estimate = (
            label, began, train_steps, eval_steps, log, on_estimate)
        self.first = FirstSteps(first_epoch_steps, device)  # not across an evaluation
        self.start = time.perf_counter()
        self.trained = 0

    def step_done(self):
        self.trained += 1
        per_step = self.first.step_done()
        if per_step is not None:
            left = per_step * (self.train_steps - self.trained + self.eval_steps)
            total = time.perf_counter() - self.began + left
            self.log(f"{self.label}: about {duration(total)} on this machine (measured over the first "
                     f"{self.first.steps} steps)")
            if self.on_estimate is not None:
                self.on_estimate(total)

    def left(self) -> str:
        """'; about 12 min left' after an epoch, '' after the last."""
        if self.trained >= self.train_steps:
            return ""
        elapsed = time.perf_counter() - self.start
        return f"; about {duration(elapsed / self.trained * (self.train_steps - self.trained))} left"


def train(cfg: dict, resume: bool = False, *, label: str = "training", on_estimate=None) -> dict:
    """Train (or distil) as ``cfg`` says; returns the summary (best and last test top-1, seed, ...). ``label`` names
    the run in its time estimate, which ``on_estimate(seconds)`` receives too. Ctrl-C (and SIGTERM, which the CLI
    turns into it) ends the run with ``Interrupted``, naming the checkpoint a rerun resumes from."""
    began = time.perf_counter()
    dist_ctx = Distributed(cfg["device"])
    last = LastCheckpoint(os.path.join(cfg["out_dir"], checkpoint.LAST))
    try:
        with _hold_run_dir(cfg["out_dir"], dist_ctx):
            return _train(cfg, resume, dist_ctx, last, label, began, on_estimate)
    except KeyboardInterrupt:
        raise last.interrupted(resume, report=dist_ctx.main) from None
    finally:
        dist_ctx.close()


@contextlib.contextmanager
def _hold_run_dir(out_dir, dist_ctx):
    """Rank 0 creates out_dir and locks it for the run's life (run_lock.py); every rank learns whether it could,
    so that none goes on to wait for a rank 0 that stopped."""
    with contextlib.ExitStack() as stack:
        error = None
        if dist_ctx.main:
            try:
                stack.enter_context(run_lock.hold(out_dir))
            except UserError as exc:
                error = exc
        if dist_ctx.all_reduce({"failed": error is not None})["failed"]:
            raise error or ConfigError(f"out_dir {out_dir} cannot be used (rank 0 says why)")
        yield


@dataclasses.dataclass
class InsideEpoch:
    """Where in its epoch a mid-epoch checkpoint stopped, as this rank goes on from it."""
    step: int  # the steps of the epoch done
    sums: dict  # their metric sums on this rank (run_epoch's)
    train_time_s: float  # their training time
    guard: dict  # the non-finite flags of the epoch so far (StepGuard.epoch_state)
    data: dict  # this rank's training loader's position()


def _inside_epoch(state, dist_ctx, device) -> InsideEpoch | None:
    """This rank's part of a mid-epoch checkpoint; None for one written at the end of an epoch."""
    partial = state.get("partial")
    if partial is None:
        return None
    if len(partial["ranks"]) != dist_ctx.world:
        raise CheckpointError(f"--resume: the checkpoint was written inside epoch {state['epoch'] + 1} by "
                              f"{len(partial['ranks'])} process(es); resume it with as many (the data of the rest of "
                              f"the epoch is split between them), not {dist_ctx.world}")
    mine = partial["ranks"][dist_ctx.rank]
    sums = {k: v.to(device) if torch.is_tensor(v) else v for k, v in mine["sums"].items()}
    return InsideEpoch(partial["step"], sums, partial["train_time_s"], partial["guard"], mine["data"])


def _train(cfg, resume, dist_ctx, last, label, began, on_estimate):
    out_dir = cfg["out_dir"]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    last_path = last.path
    if not resume and os.path.exists(last_path):
        raise ConfigError(f"out_dir {out_dir} already holds a run ({last_path}): pass --resume to continue it, "
                          "or choose another out_dir")
    state = _resume_state(cfg, out_dir) if resume else None
    seed_everything(cfg["seed"], cfg["deterministic"])
    device = dist_ctx.device
    log = print if dist_ctx.main else (lambda *a, **k: None)

    task = get_task(cfg["task"])(cfg, device)
    loss_backend = task.loss_backend()  # a backend this device cannot run is an error before any work
    parallel = Parallel(cfg["parallel"], dist_ctx.world, device)
    data = task.build_data(*parallel.data_shard(dist_ctx.rank))
    model = task.build_student()
    teacher = task.build_teacher() if task.objective.needs_teacher else None
    if teacher is None and cfg["teacher"]:
        log(f"loss {cfg['loss']!r} trains without a teacher: teacher {cfg['teacher']!r} is not used")
    n_params = sum(p.numel() for p in model.parameters())
    parallel.prepare(model, teacher, lm_head)
    autocast, amp = autocast_factory(cfg, device)
    optimizer, scheduler = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    log(f"{cfg['task']} on {cfg['dataset']} ({data.train_size} train / {data.test_size} test {data.unit}): "
        f"{cfg['model']} ({n_params / 1e6:.2f}M params), loss {cfg['loss']}"
        + (f" (ttm_kernels backend {loss_backend})" if loss_backend else "")
        + f", seed {cfg['seed']}, {device}, amp {amp}, {dist_ctx.world} process(es)"
        + (f" ({cfg['parallel']})" if parallel.mode else "") + f" -> {out_dir}")
    metric = task.best_metric
    teacher_score = None
    if teacher is not None:
        teacher_score = state.get(f"teacher_{metric}") if state else None
        if cfg["eval_teacher"] and teacher_score is None:
            teacher_eval, _, _ = run_epoch(task, teacher, None, data.test, dist_ctx, autocast,
                                           desc="teacher eval", progress=cfg["progress"])
            teacher_score = teacher_eval[metric]
        if teacher_score is not None:
            source = f" ({cfg['teacher_checkpoint']})" if cfg["teacher_checkpoint"] else ""
            log(f"teacher {cfg['teacher']}{source}: test {task.format(metric, teacher_score)}")

    steps = len(data.train)
    start_epoch, history, best, inside_epoch = 0, [], {metric: None, "epoch": 0}, None
    if state:
        parallel.load(model, optimizer, state["model"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        inside_epoch = _inside_epoch(state, dist_ctx, device)
        last.holds(start_epoch, inside_epoch.step if inside_epoch else 0, steps)
        log(f"resumed from {last_path} " + (f"at epoch {start_epoch + 1}, step {inside_epoch.step} of {steps}"
                                           if inside_epoch else f"after epoch {start_epoch}"))
    if start_epoch >= cfg["epochs"]:
        log(f"nothing to do: the run already has {start_epoch} epochs (epochs={cfg['epochs']})")

    train_model = parallel.wrap(model)
    guard = StepGuard(model, optimizer, scaler, cfg["on_nonfinite"], cfg["log_every"], dist_ctx.world)
    run_log = None
    if dist_ctx.main:
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(config.dump(cfg))
        title = f"{cfg['model']} ({cfg['loss']}) on {cfg['dataset']}"
        run_log = RunLog(out_dir, len(history), cfg["tensorboard"], title, columns(task), task.plot_panel)

    clock = CheckpointClock(cfg["checkpoint_every_min"])

    def save_last(epochs_done: int, inside: dict | None = None):
        """checkpoint_last.pt: the whole state after ``epochs_done`` epochs, and ``inside`` the next one (a
        mid-epoch checkpoint: the steps done, every rank's metric sums and data position, the guard's flags)."""
        model_state, optimizer_state = parallel.model_state(model), parallel.optimizer_state(model, optimizer)
        if dist_ctx.main:
            checkpoint.save_atomic({
                "model": model_state, "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": checkpoint.rng_state(),
                "epoch": epochs_done, "best": best, "history": history, f"teacher_{metric}": teacher_score,
                "config": cfg, **({"partial": inside} if inside else {})}, last_path)
        last.holds(epochs_done, inside["step"] if inside else 0, steps)
        guard.kept = last.kept()
        clock.reset()

    first_step = inside_epoch.step if inside_epoch else 0
    estimate = RunEstimate(
        label, began, max(0, (cfg["epochs"] - start_epoch) * steps - first_step), steps - first_step,
        # an evaluation step: a forward pass over test_batch_size samples, a third of a training step's per sample
        max(0, cfg["epochs"] - start_epoch) * len(data.test) * data.test.batch_size / data.train.batch_size / 3,
        device, log, on_estimate if dist_ctx.main else None)

    for epoch in range(start_epoch, cfg["epochs"]):
        data.train.set_epoch(epoch, inside_epoch.data if inside_epoch else None)
        lr = optimizer.param_groups[0]["lr"]
        desc = f"epoch {epoch + 1}/{cfg['epochs']}"
        guard.start_epoch(epoch, steps, last.kept())
        if inside_epoch:
            guard.resume_epoch(inside_epoch.guard)

        def after_step(step, sums, seconds, checked, epoch=epoch):
            estimate.step_done()
            if checked and step + 1 < steps and clock.due(dist_ctx):
                guard.check_weights(model)  # the loss and gradients of every step so far were just checked
                ranks = dist_ctx.gather({"sums": {k: v.cpu() if torch.is_tensor(v) else v for k, v in sums.items()},
                                         "data": data.train.position()})
                save_last(epoch, {"step": step + 1, "train_time_s": seconds, "guard": guard.epoch_state(),
                                  "ranks": ranks})

        train_means, train_time, skipped = run_epoch(task, train_model, teacher, data.train, dist_ctx, autocast,
                                                     optimizer=optimizer, scaler=scaler, guard=guard, desc=desc,
                                                     progress=cfg["progress"], resume=inside_epoch,
                                                     after_step=after_step)
        inside_epoch = None
        guard.check_weights(model)
        scheduler.step()
        test_means, eval_time, _ = run_epoch(task, model, None, data.test, dist_ctx, autocast, desc="eval",
                                             progress=cfg["progress"])
        row = {"epoch": epoch + 1, "lr": lr, **_rounded(train_means, "train_"), **_rounded(test_means, "test_"),
               "train_time_s": round(train_time, 3), "eval_time_s": round(eval_time, 3)}
        if task.better(test_means[metric], best[metric]):
            best = {metric: test_means[metric], "epoch": epoch + 1}
            model_state = parallel.model_state(model)  # every rank: fsdp and tp gather the shards
            if dist_ctx.main:
                checkpoint.save_atomic({"model": model_state, "epoch": epoch + 1, metric: best[metric],
                                        "config": cfg}, os.path.join(out_dir, checkpoint.BEST))
        history.append(row)
        if dist_ctx.main:
            run_log.write(history)
        save_last(epoch + 1)
        log(f"{desc}: lr {lr:.4g}  train loss {train_means['loss']:.4f}{_shown(task, train_means, task.train_shown)}"
            f"  test{_shown(task, test_means, task.eval_shown)} (best {task.format(metric, best[metric])} @ "
            f"{best['epoch']})  {train_time:.1f}s + eval {eval_time:.1f}s"
            + (f"; skipped {skipped} non-finite step(s)" if skipped else "") + estimate.left())
        dist_ctx.barrier()  # no rank starts the next epoch before rank 0 has saved this one

    summary = {
        "model": cfg["model"], "loss": cfg["loss"], "dataset": cfg["dataset"], "seed": cfg["seed"],
        f"train_{data.unit}": data.train_size, f"test_{data.unit}": data.test_size,
        "epochs": len(history), f"best_{metric}": best[metric] if history else None,
        "best_epoch": best["epoch"] if history else None,
        f"last_{metric}": history[-1][f"test_{metric}"] if history else None,
        "teacher": cfg["teacher"] if teacher is not None else None, f"teacher_{metric}": teacher_score,
        "loss_backend": loss_backend,
        "mean_train_time_s": sum(r["train_time_s"] for r in history) / len(history) if history else None,
        "out_dir": out_dir,
    }
    if dist_ctx.main:
        run_log.close()
        with open(os.path.join(out_dir, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=2)
        if history:
            log(f"done: {cfg['model']} ({cfg['loss']}), seed {cfg['seed']}: best test "
                f"{task.format(metric, summary[f'best_{metric}'])} (epoch {summary['best_epoch']}), last "
                f"{task.format(metric, summary[f'last_{metric}'])}; results in {out_dir}")
    return summary
