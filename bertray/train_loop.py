"""The one training loop, shared by masked-LM pretraining and classification fine-tuning.

What differs between the two is an `Objective` (model head, batches, loss, evaluation, checkpoint metadata);
everything else lives here once: AdamW with decoupled weight decay, warmup + linear/cosine decay, gradient
accumulation and clipping, mixed precision on GPU, periodic evaluation with checkpoints, early stopping,
progress lines, and exact resume (same step, same batch) from the latest checkpoint.

The loop runs inside a Ray Train worker (DDP across workers) or directly as a Ray Tune trial (one process);
`_Session` hides which.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import torch
from transformers import get_scheduler

from bertray import checkpoint as ckpt_io
from bertray import modeling

log = logging.getLogger(__name__)

# A process's checkpoint and restore scratch directories carry its pid, so a later worker on the node can tell
# which ones a killed process left behind (see _remove_orphaned_scratch).
_SCRATCH_NAME = re.compile(r"bertray-(ckpt|restore)-(\d+)-[^/]+")
_ORPHAN_MIN_AGE_S = 3600


class Objective:
    """What a training objective supplies to the loop. Subclasses are built on the driver (cheap, picklable) and
    `setup` runs once on each worker."""

    kind = "base"  # 'classifier' or 'mlm'; written into the checkpoint
    metric = "loss"  # reported metric that picks the best checkpoint and drives early stopping
    mode = "min"  # 'min' or 'max'

    def setup(self, rank: int, world: int, device: torch.device) -> None: ...

    def build_model(self) -> torch.nn.Module: ...

    @property
    def tokenizer(self): ...

    def steps_per_epoch(self) -> int | None:
        """Micro-batches per epoch on this rank, equal on every rank; None for streams (schedule by max_steps)."""
        return None

    def train_batches(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches for `epoch`, starting after the first `skip` (resume)."""
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(self, model, device: torch.device) -> dict[str, float]:
        """Metrics on held-out data, identical on every rank (workers all-reduce their shares)."""
        raise NotImplementedError

    def checkpoint_meta(self) -> dict:
        return {"kind": self.kind}


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    resumed_at: list[int] = field(default_factory=list)  # step of every resume from a checkpoint


# --------------------------------------------------------------------------------------------------- sessions


class _Session:
    """Ray Train worker: DDP over the worker group, reports through ray.train."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._train = ray.train
        self.worker_nodes = _gather_node_ids(self.world)

    def get_checkpoint(self):
        return self._train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt)

    def prepare(self, model):
        import ray.train.torch

        # DDP waits for a gradient of every trainable weight unless told to look for unused ones, and looking costs
        # a traversal of the autograd graph at every step: only a model with weights its forward skips pays it.
        unused = modeling.unused_trainable(model) if self.world > 1 else []
        if unused and self.rank == 0:
            log.info("trainable weights that get no gradient (DDP will look for them each step): %s",
                     ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused != []})


class _TuneSession(_Session):
    """A Ray Tune trial running the loop in its own process (no DDP); PBT and ASHA see every report."""

    def __init__(self):
        import ray.tune

        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._tune = ray.tune
        self.worker_nodes = _gather_node_ids(1)

    def get_checkpoint(self):
        return self._tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from ray.tune import Checkpoint

        self._tune.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def prepare(self, model):
        return model.to(self.device)


# --------------------------------------------------------------------------------------------------- the loop


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite: nothing is exported (the message says when, and what to change)."""


def train_loop_per_worker(config: dict) -> str | None:
    """Entry point for Ray Train (`TorchTrainer(train_loop_per_worker, train_loop_config=config)`) and Tune.

    config: {"cfg": stage config (dataclass), "objective": Objective, "session": "train"|"tune",
             "overrides": {dotted key: value} applied by Tune per trial}, or {"sealed": an object reference to it}."""
    if "sealed" in config:
        import ray

        config = ray.get(config["sealed"])
    if config.get("quiet"):
        _quiet_train_reports()
    session = _TuneSession() if config.get("session") == "tune" else _Session()
    cfg = config["cfg"]
    if config.get("overrides"):
        cfg = _apply_overrides(cfg, config["overrides"])
    objective: Objective = config["objective"]
    _remove_orphaned_scratch()
    _seed(cfg.train.seed + session.rank)
    torch.set_num_threads(max(1, int(os.environ.get("BERTRAY_TORCH_THREADS", torch.get_num_threads()))))
    objective.setup(session.rank, session.world, session.device)
    return Loop(cfg, objective, session, tracker=config.get("tracker")).run()


class Loop:
    def __init__(self, cfg, objective: Objective, session: _Session, tracker=None):
        self.cfg, self.obj, self.s = cfg, objective, session
        self.is_main = session.rank == 0
        self.tracker = tracker if self.is_main else None  # bertray.tracking.Run: rank 0 logs metrics to MLflow
        self.device = session.device
        self.state = LoopState()
        model = objective.build_model()
        restored = session.get_checkpoint()
        # A restored checkpoint is copied to a scratch directory, read into memory below, then deleted: every
        # resume (and every PBT exploit) would otherwise leave a model-sized copy behind in /tmp.
        restore_tmp = _scratch_dir("restore") if restored is not None else None
        if restore_tmp is not None:
            restored.to_directory(restore_tmp.name)
            _load_weights(model, restore_tmp.name)
        self.model = session.prepare(model)
        self.optimizer = _setup_optimizer(self.model, cfg.optim, self.device)
        spe = objective.steps_per_epoch()
        accum = cfg.optim.grad_accum_steps
        self.steps_per_epoch = None if spe is None else max(1, spe // accum)
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * self.steps_per_epoch)
        warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else int(cfg.optim.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(
            {"constant": "constant_with_warmup"}.get(cfg.optim.schedule, cfg.optim.schedule),
            self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)
        self.amp_dtype = modeling.amp_dtype(cfg.train.mixed_precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.eval_every = cfg.train.eval_every or self.steps_per_epoch or self.total_steps
        if restore_tmp is not None:
            self._restore_state(restore_tmp.name)
            restore_tmp.cleanup()

    # ----------------------------------------------------------------------------------------------- driving

    def run(self) -> str | None:
        """Train to the end; returns None, or the one-line message of a run whose loss stopped being finite (Ray
        Train hands rank 0's return value to the driver as Result.return_value)."""
        st, cfg = self.state, self.cfg
        accum = cfg.optim.grad_accum_steps
        if self.is_main:
            self._print(f"training {self.total_steps} steps ({self.s.world} worker(s) x batch {cfg.train.batch_size} "
                        f"x accum {accum}); evaluating every {self.eval_every} steps"
                        + (f"; resumed at step {st.step}" if st.step else ""))
        reported = False
        window = _Window()
        self.model.train()
        while st.step < self.total_steps and not st.stopped_early:
            micro = st.micro_in_epoch
            for batch in self.obj.train_batches(st.epoch, skip=micro):
                # Counted on the host copy: reading a GPU tensor back (int(), .item()) waits for the GPU to finish
                # every queued kernel, and then the host cannot prepare the next batch while the GPU works.
                n_samples, n_tokens = int(batch["attention_mask"].shape[0]), int(batch["attention_mask"].sum())
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                micro += 1
                sync = micro % accum == 0
                # Skip DDP's gradient all-reduce on accumulation micro-batches; only the last one syncs.
                no_sync = getattr(self.model, "no_sync", None)
                with (nullcontext() if sync or no_sync is None else no_sync()):
                    with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                        loss = self.obj.loss(self.model, batch)
                    self.scaler.scale(loss / accum).backward()
                window.add(loss.detach(), n_samples, n_tokens)
                if not sync:
                    continue
                self._optimizer_step()
                st.micro_in_epoch = micro
                st.step += 1
                if st.step % cfg.train.log_every == 0 or st.step == self.total_steps:
                    self._log_progress(window)
                    if diverged := self._diverged():
                        return diverged
                if st.step % self.eval_every == 0 or st.step == self.total_steps:
                    self._evaluate_and_report()
                    reported = True
                    self.model.train()
                    window = _Window()  # throughput windows measure training only, not evaluation or checkpoints
                if st.step >= self.total_steps or st.stopped_early:
                    break
            else:
                st.epoch += 1
                st.micro_in_epoch = 0
                if self.steps_per_epoch is None:
                    continue  # a stream ended early: go round again
        if not reported:
            # A re-run of a finished run: report the restored state once so the driver has a result.
            self._evaluate_and_report()
        return None

    def _diverged(self) -> str | None:
        """If the loss just logged is not finite on any rank, why the run ends here, in one line (nothing is
        exported); else None. Checked at progress lines only, where the loss is read back anyway."""
        st = self.state
        bad = torch.tensor([0.0 if math.isfinite(st.history[-1]["train_loss"]) else 1.0], device=self.device)
        if self.s.world > 1:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank must stop together, or the others hang
        if not bad.item():
            return None
        last = next((h for h in reversed(st.history[:-1]) if math.isfinite(h.get("train_loss", math.nan))), None)
        message = (f"training diverged: the loss was not finite by step {st.step}"
                   + (f" (last finite loss {last['train_loss']:.4f} at step {last['step']})" if last else "")
                   + "; nothing was exported. Lower optim.lr, or set optim.max_grad_norm")
        if self.is_main:
            self._print(message)
        if isinstance(self.s, _TuneSession):
            raise TrainingDiverged(message)  # the trial ends as failed, and the sweep goes on
        return message

    def _optimizer_step(self) -> None:
        max_norm = self.cfg.optim.max_grad_norm
        if max_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log_progress(self, window: "_Window") -> None:
        st = self.state
        loss, samples, tokens, secs = window.take()
        # Throughput is global: every worker processes the same number of samples per step.
        samples *= self.s.world
        tokens_all = tokens * self.s.world
        st.samples += samples
        st.tokens += tokens_all
        st.train_seconds += secs
        rate = samples / secs if secs else 0.0
        eta = (self.total_steps - st.step) * secs / max(1, self.cfg.train.log_every)
        st.history.append({"step": st.step, "train_loss": loss, "samples_per_s": rate,
                           "tokens_per_s": tokens_all / secs if secs else 0.0, "lr": self.scheduler.get_last_lr()[0]})
        if self.tracker is not None:
            self.tracker.log_metrics(st.history[-1], st.step)
        if self.is_main:
            self._print(f"step {st.step}/{self.total_steps} epoch {st.epoch} loss {loss:.4f} "
                        f"lr {self.scheduler.get_last_lr()[0]:.2e} {rate:.1f} samples/s "
                        f"{tokens_all / secs if secs else 0:.0f} tokens/s ETA {_fmt_secs(eta)}")

    def _evaluate_and_report(self) -> None:
        st, cfg = self.state, self.cfg
        # The plain module, not the DDP wrapper: DDP's forward broadcasts buffers, which hangs if a rank has
        # no evaluation rows. Ranks combine their shares explicitly inside evaluate().
        metrics = self.obj.evaluate(getattr(self.model, "module", self.model), self.device)
        value = metrics[self.obj.metric]
        better = st.best is None or (value > st.best if self.obj.mode == "max" else value < st.best)
        if better:
            st.best, st.best_step, st.bad_evals = value, st.step, 0
        else:
            st.bad_evals += 1
            if cfg.train.patience and st.bad_evals >= cfg.train.patience:
                st.stopped_early = True
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        st.history.append({"step": st.step, **scalars})
        report = {
            **scalars,
            "step": st.step,
            "planned_steps": self.total_steps,  # a sweep ends a trial there (tune._trial_end)
            "epoch": st.epoch,
            # Training progress in epochs (fractional): ASHA's rungs are placed in it, so trials with different
            # batch sizes or evaluation intervals are compared after the same amount of data, not the same count
            # of reports.
            **({"epochs": st.step / self.steps_per_epoch} if self.steps_per_epoch else {}),
            "train_loss": next((h["train_loss"] for h in reversed(st.history) if "train_loss" in h), float("nan")),
            "samples_per_s": st.samples / st.train_seconds if st.train_seconds else 0.0,
            "tokens_per_s": st.tokens / st.train_seconds if st.train_seconds else 0.0,
            "best": st.best,
            "stopped_early": st.stopped_early,
        }
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scalars.items() if k in ("loss", "accuracy", "micro_f1", "macro_f1", "perplexity"))
            if self.tracker is not None:
                self.tracker.log_metrics(scalars, st.step)
            self._print(f"eval at step {st.step}: {shown}" + (" (best)" if better else "")
                        + (" -> early stop" if st.stopped_early else ""))
        with _scratch_dir("ckpt") as tmp:
            if self.is_main:
                self._save(tmp, metrics)
            self.s.report(report, tmp if self.is_main else None)

    # ----------------------------------------------------------------------------------------------- checkpoints

    def _save(self, directory: str, metrics: dict) -> None:
        st = self.state
        meta = {
            **self.obj.checkpoint_meta(),
            "config": _config_dict(self.cfg),
            "metrics": metrics,
            "step": st.step,
            "total_steps": self.total_steps,
            "history": st.history,
            "worker_nodes": self.s.worker_nodes,
            "resumed_at": st.resumed_at,
        }
        ckpt_io.save(directory, self.model, self.obj.tokenizer, meta)
        torch.save({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loop": asdict(st),
            "rng": {"python": random.getstate(), "numpy": _numpy_rng_state(), "torch": torch.get_rng_state()},
        }, Path(directory) / ckpt_io.TRAIN_STATE)

    def _restore_state(self, directory: str) -> None:
        path = Path(directory) / ckpt_io.TRAIN_STATE
        try:
            # Tensors and plain containers only: whoever can write to run.storage must not run code in the workers.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise RuntimeError(f"{path}: holds more than tensors and plain values, so it is not loaded (written by "
                               f"an older bertray, or altered): {str(exc).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = LoopState(**state["loop"])
        self.state.resumed_at.append(self.state.step)
        random.setstate(state["rng"]["python"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        # The config, not the checkpoint, sets lr and weight decay: PBT restores a trial with them perturbed (its
        # explore step); optimizer moments, step count and schedule position carry over. A plain resume is unchanged.
        self._apply_optim_config()

    def _apply_optim_config(self) -> None:
        o = self.cfg.optim
        self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = o.lr
            group["lr"] = o.lr * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.param_groups[0]["weight_decay"] = o.weight_decay  # group 1 (biases, LayerNorm) stays at 0

    def _print(self, msg: str) -> None:
        # Straight to stdout, which Ray forwards to the driver once: Ray Train patches print() into a logger
        # that echoes every line a second time.
        sys.stdout.write(f"[bertray] {msg}\n")
        sys.stdout.flush()


class _Window:
    """Loss, samples and tokens since the last progress line. The loss is summed where it was computed (on the
    GPU, a device tensor) and read back only when a progress line is printed, not every step."""

    def __init__(self):
        self.start = time.perf_counter()
        self.loss = self.samples = self.tokens = self.n = 0

    def add(self, loss: torch.Tensor | float, samples: int, tokens: int) -> None:
        self.loss = self.loss + loss
        self.samples += samples
        self.tokens += tokens
        self.n += 1

    def take(self) -> tuple[float, int, int, float]:
        # Read the loss before the clock: float() of a device tensor waits for the GPU's queued work, which belongs
        # to this window's time.
        loss = float(self.loss) / max(1, self.n)
        now = time.perf_counter()
        out = (loss, self.samples, self.tokens, now - self.start)
        self.__init__()
        return out


# --------------------------------------------------------------------------------------------------- helpers


def _setup_optimizer(model, optim, device) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm weights (as in BERT); frozen parameters are left out entirely.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel exists for CPU and CUDA; on CPU the per-parameter loop was a fifth of each MiniLM training
    # step (BENCHMARKS.md, "Fine-tuning throughput").
    return torch.optim.AdamW(groups, lr=optim.lr, eps=optim.adam_eps, fused=device.type in ("cpu", "cuda"))


def _load_weights(model, directory: str) -> None:
    from safetensors.torch import load_file

    if (Path(directory) / ckpt_io.ADAPTER_WEIGHTS).exists():
        _load_adapter(model, directory)
        return
    state = load_file(str(Path(directory) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied tensors (the MLM decoder's weight and bias) are stored once; anything else missing means a mismatched checkpoint.
    real_missing = [k for k in missing if not k.endswith(("decoder.weight", "decoder.bias"))]
    if real_missing or unexpected:
        raise RuntimeError(f"checkpoint at {directory} does not match the model: missing {real_missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _load_adapter(model, directory: str) -> None:
    """An adapter checkpoint (adapter and head only) into a model rebuilt from the same base with the same adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not hasattr(model, "peft_config"):
        raise RuntimeError(f"checkpoint at {directory} holds an adapter, and the model has none (model.adapter)")
    state = load_file(str(Path(directory) / ckpt_io.ADAPTER_WEIGHTS))
    missing, unexpected = set_peft_model_state_dict(model, state)
    # The frozen base weights are not in the checkpoint; any trained weight missing means a mismatched checkpoint.
    real_missing = [k for k in missing if "lora_" in k or "modules_to_save" in k]
    if real_missing or unexpected:
        raise RuntimeError(f"checkpoint at {directory} does not match the model's adapter: missing "
                           f"{real_missing[:5]}, unexpected {unexpected[:5]}")


def _gather_node_ids(world: int) -> list[str]:
    """Ray node id of every worker, in rank order (recorded in checkpoints: shows where training ran)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world > 1 and dist.is_initialized():
        nodes: list = [None] * world
        dist.all_gather_object(nodes, node)
        return nodes
    return [node]


def _scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"bertray-{kind}-{os.getpid()}-")


def _remove_orphaned_scratch() -> None:
    """Delete scratch directories of processes that no longer exist.

    A SIGKILLed worker (the failure that resuming exists for) never runs TemporaryDirectory's cleanup, and what it
    leaves is a whole checkpoint: weights plus twice their size in optimizer state. The age floor keeps this off a
    directory being written by a live process that shares /tmp from another pid namespace, where its pid means
    nothing here."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob("bertray-*-*-*"):
        m = _SCRATCH_NAME.fullmatch(path.name)
        try:
            if not m or psutil.pid_exists(int(m.group(2))) or time.time() - path.stat().st_mtime < _ORPHAN_MIN_AGE_S:
                continue
        except FileNotFoundError:  # another worker on this node removed it first
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d scratch director%s left in %s by killed processes", removed,
                 "y" if removed == 1 else "ies", tempfile.gettempdir())


def _quiet_train_reports() -> None:
    """Ray Train logs the repr of every report (metrics and checkpoint) at INFO under a logger named by its file's
    path, which RunConfig's LoggingConfig does not reach (it filters `ray.train.*` names); the same level here."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray: its loggers are its LoggingConfig's
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fmt_secs(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _config_dict(cfg) -> dict:
    from bertray.config import to_dict

    return json.loads(json.dumps(to_dict(cfg), default=str))


def _apply_overrides(cfg, overrides: dict):
    """A copy of `cfg` with dotted keys replaced (Tune trials); values arrive already typed."""
    import copy

    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = cfg
        for p in path:
            node = getattr(node, p)
        current = getattr(node, last)
        setattr(node, last, type(current)(value) if isinstance(current, (int, float)) and not isinstance(current, bool) else value)
    return cfg


def _numpy_rng_state() -> dict:
    """numpy's global RNG state with its key array as a tensor, which torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))
