"""One generic Lightning module around any method, and the ``train`` entry point.

The module knows nothing of any method: it augments the uint8 batch on the device with the
method's recipe, calls ``method.training_step``, trains an online linear probe on the detached
features it returns, and calls ``method.on_after_optimizer_step`` after every optimizer step.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from selfsup.augment import build_view_generator
from selfsup.backbones import build_backbone
from selfsup.checkpoint import AtomicCheckpointIO, load_checkpoint_file, resolve_resume
from selfsup.config import Config
from selfsup.data import DataInfo, DataSplits, SkipLog, build_loader, load_data
from selfsup.distributed import (convert_to_global_batchnorm, gather_no_grad, is_distributed,
                                 world_size)
from selfsup.errors import SelfSupError
from selfsup.evaluate.knn import knn_top1
from selfsup.evaluate.metrics import collapse_metrics, collapse_warning
from selfsup.methods import Batch, Method, MethodContext, build_method
from selfsup.optim import (WarmupCosine, build_optimizer, constant_schedule,
                           scaled_learning_rate, schedule_weight_decay)
from selfsup.precision import accelerator_device_type, resolve_precision


class NonFiniteLossError(SelfSupError):
    """The loss became NaN or infinite."""


def _stream_seed(seed: int, step: int, stream: int) -> int:
    # Distinct, reproducible seeds per (run seed, step, stream); resuming at step s replays them.
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)


def data_info_dict(info: DataInfo) -> dict[str, Any]:
    return {"name": info.name, "num_classes": info.num_classes,
            "class_names": list(info.class_names), "image_size": info.image_size,
            "mean": list(info.mean), "std": list(info.std), "num_train": info.num_train}


def resolved_cifar_stem(config: Config, info: dict[str, Any]) -> bool:
    """``backbone.cifar_stem``, with None meaning: the CIFAR stem for images of 64 px or less."""
    if config.backbone.cifar_stem is not None:
        return config.backbone.cifar_stem
    return info["image_size"] <= 64


def build_pretraining_method(config: Config, info: dict[str, Any]) -> Method:
    """The method with its backbone, initialised from ``config.train.seed`` (so that a second
    call gives the same random-init network: the baseline of every evaluation)."""
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    # The configured architecture for any number of input channels (a partial, not a closure, so
    # the method stays picklable); the backbone itself is the RGB one.
    backbone_factory = functools.partial(build_backbone, config.backbone.name,
                                         resolved_cifar_stem(config, info), config.backbone.width)
    backbone, feature_dim = backbone_factory(3)
    context = MethodContext(feature_dim=feature_dim, num_samples=info["num_train"],
                            num_classes=info["num_classes"], image_size=info["image_size"],
                            image_mean=tuple(info["mean"]), image_std=tuple(info["std"]),
                            backbone_factory=backbone_factory)
    return build_method(config.method, backbone, context, config.method_args)


def _numpy_rng_state() -> dict[str, Any]:
    import numpy as np

    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "position": position,
            "has_gauss": has_gauss, "cached": cached}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    np.random.set_state((state["name"], state["keys"].numpy().astype("uint32"), state["position"],
                         state["has_gauss"], state["cached"]))


def _python_rng_state() -> list[Any]:
    import random

    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(state: list[Any]) -> None:
    import random

    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


class SelfSupervisedModule(L.LightningModule):
    def __init__(self, config: dict[str, Any], data_info: dict[str, Any],
                 steps_per_epoch: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "data_info": data_info})
        self.config = Config(**config)
        self.data_info = data_info
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.method = build_pretraining_method(self.config, data_info)
        if self.config.train.sync_batchnorm:
            convert_to_global_batchnorm(self.method)
        size, mean, std = data_info["image_size"], data_info["mean"], data_info["std"]
        self.view_generator = build_view_generator(self.method.views, size, mean, std,
                                                   num_views=self.method.num_views)
        self.clean_view = build_view_generator("eval", size, mean, std, num_views=1)
        self.probe: nn.Linear | None = None
        if self.config.eval.online_probe and data_info["num_classes"] > 0:
            self.probe = nn.Linear(self.method.context.feature_dim, data_info["num_classes"])
        self.probe_optimizer: torch.optim.Optimizer | None = None
        self._monitor_outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long))
        self._skip_update = False
        self._saved_buffers: dict[str, torch.Tensor] = {}
        # The effective ranks logged this epoch, with the largest rank their batches allow.
        self._epoch_ranks: list[float] = []
        self._rank_ceiling = 0
        self.collapse_warning: str | None = None  # the warning of the first epoch that collapsed

    # -- optimisation ---------------------------------------------------------------------------
    def total_steps(self) -> int:
        train = self.config.train
        steps = math.inf
        if train.epochs is not None:
            steps = train.epochs * self.steps_per_epoch
        if train.max_steps is not None:
            steps = min(steps, train.max_steps)
        return int(steps)

    def global_batch_size(self) -> int:
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.config.train.batch_size * world

    def configure_optimizers(self):
        optimizer = build_optimizer(
            [(n, p) for n, p in self.method.named_parameters() if p.requires_grad],
            self.config.optim, self.global_batch_size(), self.method.fixed_lr_modules)
        warmup = round(self.config.optim.warmup_epochs * self.steps_per_epoch)
        warmup_cosine = WarmupCosine(warmup, self.total_steps())
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [constant_schedule if group["fixed_lr"] else warmup_cosine
                        for group in optimizer.param_groups])
        if self.probe is not None:
            # The probe has an optimizer of its own, stepped by hand, so Lightning's step count
            # (and max_steps) counts pretraining steps only.
            self.probe_optimizer = torch.optim.AdamW(self.probe.parameters(),
                                                     lr=self.config.eval.online_probe_lr,
                                                     weight_decay=0.0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- training -------------------------------------------------------------------------------
    def _generator(self, stream: int) -> torch.Generator:
        device = self.device if stream > 0 else torch.device("cpu")
        generator = torch.Generator(device=device)
        generator.manual_seed(_stream_seed(self.config.train.seed, self.global_step, stream))
        return generator

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int
                      ) -> torch.Tensor | None:
        images, labels, index = batch
        # Augmentation differs per process (stream 1 + rank); method randomness is shared (0).
        views, view_boxes = self.view_generator.views_and_boxes(
            images, self._generator(1 + self.global_rank), record_boxes=self.method.uses_view_boxes)
        if self.config.train.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        may_skip = self.config.train.max_nonfinite_skips > 0
        # A skipped step must leave no trace: queues, banks, centres and BN statistics are all
        # buffers, and the step may already have written to them.
        saved_buffers = ({name: b.clone() for name, b in self.method.named_buffers()}
                         if may_skip else {})
        output = self.method.training_step(Batch(views, labels, index, self._generator(0),
                                                 self.epoch_progress(), view_boxes))
        loss = output.loss
        self._saved_buffers = saved_buffers  # for a skip decided here or on the gradients
        # Every process must take the same decision, or DDP's gradient reduction would hang.
        finite = bool(gather_no_grad(torch.isfinite(loss.detach()).reshape(1)).all())
        if not finite:
            parts = {k: float(v) for k, v in output.logs.items()}
            self._skip_or_stop(f"non-finite loss {loss.item()} at step {self.global_step} "
                               f"(parts: {parts})")
            # Not None: under DDP every process must still run a backward that reaches every
            # parameter. Its zero gradients are then dropped before the update.
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        logs = {"train/loss": loss.detach(), **{f"train/{k}": v for k, v in output.logs.items()}}
        if output.embeddings and self.global_step % self.config.train.log_every == 0:
            health = collapse_metrics(output.embeddings)
            logs.update({f"train/{k}": v for k, v in health.items()})
            self._epoch_ranks.append(health["effective_rank"])
            self._rank_ceiling = min(output.embeddings[0].shape)
        if self.probe is not None and output.features is not None and labels is not None:
            labelled = labels >= 0
            if labelled.any():
                logits = self.probe(output.features.detach().float()[labelled])
                probe_loss = F.cross_entropy(logits, labels[labelled])
                logs["train/probe_loss"] = probe_loss.detach()
                logs["train/probe_top1"] = (logits.argmax(1) == labels[labelled]).float().mean()
                loss = loss + probe_loss
        logs["train/lr"] = max(g["lr"] for g in self.trainer.optimizers[0].param_groups
                               if not g["fixed_lr"])
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", output.loss.detach(), prog_bar=True, on_step=True, logger=False)
        return loss

    def _skip_or_stop(self, where: str) -> None:
        """A non-finite step: in skip mode (``train.max_nonfinite_skips``), undo what it wrote to
        the buffers and mark it skipped; past the allowance, or without skip mode, stop."""
        allowed = self.config.train.max_nonfinite_skips
        if int(self.nonfinite_skips) < allowed:
            with torch.no_grad():
                for name, buffer in self.method.named_buffers():
                    buffer.copy_(self._saved_buffers[name])
            self.nonfinite_skips += 1
            self._skip_update = True
            rank_zero_warn(f"selfsup: {where}: step skipped ({int(self.nonfinite_skips)} of "
                           f"at most {allowed})")
            return
        skipped = f" after skipping {int(self.nonfinite_skips)} such steps" if allowed else ""
        raise NonFiniteLossError(f"{where}{skipped}; the last good checkpoint is in "
                                 f"{Path(self.config.train.out) / 'checkpoints'}")

    def _check_gradients(self) -> None:
        """A finite loss can still have a non-finite gradient (log(1 - p) at p = 1, an overflow
        in bf16), which one update would spread to every weight. After DDP's reduction every
        process holds the same gradients, so all take the same decision without a collective."""
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        if not named:
            return
        # One fused norm per tensor (as clip_grad_norm_ does): inf or NaN where any entry is.
        norms = torch.stack(torch._foreach_norm([g for _, g in named]))
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        if bad:
            names = ", ".join(named[i][0] for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
            self._skip_or_stop(f"non-finite gradient at step {self.global_step} in {len(bad)} "
                               f"parameter tensors ({names}) with a finite loss")

    def epoch_progress(self) -> float:
        """The current step counted in epochs (``Batch.epoch``)."""
        return self.global_step / self.steps_per_epoch

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._skip_update:
            self._check_gradients()
        if self._skip_update:
            # No gradient, no update: SGD, LARS and AdamW leave such parameters, and their
            # momentum and weight decay, untouched.
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
            return
        schedule_weight_decay(optimizer, self.config.optim,
                              self.global_step / max(self.total_steps() - 1, 1))
        self.method.on_before_optimizer_step(self.epoch_progress())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._skip_update:  # a skipped non-finite step: no probe or momentum update either
            self._skip_update = False
            if self.probe_optimizer is not None:
                self.probe_optimizer.zero_grad(set_to_none=True)
            return
        # Here, not in on_train_batch_end: checkpoint callbacks run before that hook, and a
        # mid-epoch checkpoint must hold the momentum encoder and probe of the same step.
        if self.probe_optimizer is not None:
            self.probe_optimizer.step()
            self.probe_optimizer.zero_grad(set_to_none=True)
        self.method.on_after_optimizer_step(min(self.global_step / self.total_steps(), 1.0))

    # -- monitoring: kNN and online-probe accuracy on the validation split ----------------------
    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        images, labels, _ = batch
        (view,) = self.clean_view(images, None)
        features = self.method.backbone(view).float()
        self._monitor_outputs.setdefault(dataloader_idx, []).append((features, labels))

    def on_train_epoch_end(self) -> None:
        warning = collapse_warning(self._epoch_ranks, self._rank_ceiling, self.current_epoch)
        self._epoch_ranks = []
        if warning is not None and self.collapse_warning is None:
            self.collapse_warning = warning
            rank_zero_warn(warning)

    def on_validation_epoch_end(self) -> None:
        if len(self._monitor_outputs) < 2:
            self._monitor_outputs.clear()
            return
        bank, queries = ([torch.cat(parts) for parts in zip(*self._monitor_outputs[i])]
                         for i in (0, 1))
        self._monitor_outputs.clear()
        metrics = {"val/knn_top1": knn_top1(*bank, *queries, self.data_info["num_classes"],
                                            self.config.eval.knn_k,
                                            self.config.eval.knn_temperature)}
        if self.probe is not None:
            with torch.no_grad():
                predictions = self.probe(queries[0]).argmax(1)
            metrics["val/probe_top1"] = (predictions == queries[1]).float().mean().item()
        self.log_dict(metrics, prog_bar=True, sync_dist=False, rank_zero_only=True)

    # -- checkpoint: what Lightning does not save on its own ------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.probe_optimizer is not None:
            checkpoint["probe_optimizer"] = self.probe_optimizer.state_dict()
        # Augmentation and method randomness are seeded from (seed, step) and the data order from
        # (seed, epoch), so none of them needs a saved state; the global generators are saved
        # anyway (as plain data, loadable with weights_only) for user code that draws from them.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "numpy": _numpy_rng_state(), "python": _python_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_probe_state = checkpoint.get("probe_optimizer")
        states = checkpoint.get("rng_states")
        if states is not None:
            torch.set_rng_state(states["torch"])
            _set_numpy_rng_state(states["numpy"])
            _set_python_rng_state(states["python"])

    def on_train_start(self) -> None:
        state = getattr(self, "_pending_probe_state", None)
        if state is not None and self.probe_optimizer is not None:
            self.probe_optimizer.load_state_dict(state)


def gather_skips(skips: SkipLog) -> None:
    """Add the bad samples every other process met to ``skips`` (each process decodes its own
    share of the data), so that the count reported at the end is the run's."""
    if not is_distributed():
        return
    import torch.distributed as dist

    per_process: list[list[str]] = [[] for _ in range(world_size())]
    dist.all_gather_object(per_process, skips.problems())
    for problems in per_process:
        for problem in problems:
            skips.add(problem)


def _monitor_loaders(splits: DataSplits, config: Config, skips: SkipLog | None) -> list[Any]:
    from torch.utils.data import Subset

    bank = splits.train
    if len(bank) > config.eval.monitor_bank_size:
        chosen = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))
        bank = Subset(bank, chosen[: config.eval.monitor_bank_size].tolist())
    return [build_loader(d, config.eval.batch_size, shuffle=False, drop_last=False,
                         num_workers=0, skips=skips) for d in (bank, splits.val)]


def plot_loss_curve(metrics_csvs: list[Path], out_png: Path) -> Path | None:
    """Plot train/loss (and the validation kNN accuracy when logged) from the CSV logs of every
    attempt of a run; a later attempt's value for a step replaces an earlier one's."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_by_step: dict[int, float] = {}
    knn_by_step: dict[int, float] = {}
    for metrics_csv in metrics_csvs:
        with metrics_csv.open() as stream:
            for row in csv.DictReader(stream):
                if row.get("train/loss"):
                    loss_by_step[int(row["step"])] = float(row["train/loss"])
                if row.get("val/knn_top1"):
                    knn_by_step[int(row["step"])] = float(row["val/knn_top1"])
    if not loss_by_step:
        return None
    steps, losses = zip(*sorted(loss_by_step.items()))
    knn_steps, knn = zip(*sorted(knn_by_step.items())) if knn_by_step else ((), ())
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, losses, color="tab:blue", label="train loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    if knn:
        twin = axis.twinx()
        twin.plot(knn_steps, knn, "o-", color="tab:orange", label="val kNN top-1")
        twin.set_ylabel("val kNN top-1")
    figure.legend(loc="upper center", ncol=2, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


def train(config: Config) -> dict[str, Any]:
    """Pretrain ``config.method``; then evaluate it beside its random-init baseline.

    Returns the results (also written to ``OUT/results.json``); ``OUT/checkpoints/last.ckpt`` holds
    the final state.
    """
    from selfsup.evaluate import evaluate_backbone, evaluate_knn_bank

    # -- output-folder guard (selfsup.outputs): never train over an earlier run by accident ----
    from selfsup.outputs import prepare_out_dir

    prepare_out_dir(config.train.out, resume=config.train.resume,
                    overwrite=config.train.overwrite)
    # -- end of guard -----------------------------------------------------------------------------
    out = Path(config.train.out)
    checkpoint_dir = out / "checkpoints"
    # data.skip_bad: every bad sample met (scanning, training, monitoring, evaluating) goes here.
    skips = SkipLog() if config.data.skip_bad else None
    splits = load_data(config.data.source, image_size=config.data.image_size,
                       val_fraction=config.data.val_fraction, seed=config.train.seed,
                       download=config.data.download, skips=skips)
    info = data_info_dict(splits.info)
    loader = build_loader(splits.train, config.train.batch_size, shuffle=True, drop_last=True,
                          num_workers=config.data.num_workers, seed=config.train.seed,
                          skips=skips)
    world = config.train.devices * config.train.num_nodes
    # What each process's ResumableSampler yields: its share, in whole batches.
    steps_per_epoch = max(len(splits.train) // world // config.train.batch_size, 1)
    module = SelfSupervisedModule(config.model_dump(mode="json"), info, steps_per_epoch)
    if config.train.channels_last:
        module = module.to(memory_format=torch.channels_last)

    checkpointing = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="step{step:08d}", auto_insert_metric_name=False,
        every_n_train_steps=config.train.checkpoint_every, save_last=True,
        save_top_k=config.train.keep_checkpoints if config.train.checkpoint_every else 0,
        monitor="step", mode="max")
    # One log version per attempt (version_0, version_1, ... after each resume): a resumed run
    # never deletes the metrics its earlier attempts wrote.
    loggers = [CSVLogger(out / "logs", name="csv"),
               TensorBoardLogger(out / "logs", name="tensorboard")]
    precision = resolve_precision(config.train.precision,
                                  accelerator_device_type(config.train.accelerator))
    trainer = L.Trainer(
        accelerator=config.train.accelerator, devices=config.train.devices,
        num_nodes=config.train.num_nodes, strategy="ddp" if world > 1 else "auto",
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        max_epochs=config.train.epochs if config.train.epochs is not None else -1,
        max_steps=config.train.max_steps or -1, logger=loggers, callbacks=[checkpointing],
        log_every_n_steps=config.train.log_every, num_sanity_val_steps=0,
        check_val_every_n_epoch=max(config.eval.monitor_every_n_epochs, 1),
        limit_val_batches=1.0 if config.eval.monitor_every_n_epochs and info["num_classes"]
        else 0, plugins=[AtomicCheckpointIO()], enable_progress_bar=config.train.progress_bar,
        enable_model_summary=False, default_root_dir=out,
        # ResumableSampler splits the data across processes itself, and must not be replaced.
        use_distributed_sampler=False)
    # Lightning's warning does not apply: ResumableSampler continues a cut epoch exactly.
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before")
    resume = resolve_resume(config.train.resume, checkpoint_dir, config.model_dump(mode="json"),
                            warn=rank_zero_warn)
    if resume is not None:
        # Continue the interrupted epoch after the batches it already trained on.
        global_step = load_checkpoint_file(resume, mmap=True)["global_step"]
        loader.sampler.resume_at(global_step // steps_per_epoch, global_step % steps_per_epoch)
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader,
                val_dataloaders=_monitor_loaders(splits, config, skips), ckpt_path=resume)
    train_seconds = time.perf_counter() - started
    trainer.save_checkpoint(checkpoint_dir / "last.ckpt", weights_only=False)
    if skips is not None:
        gather_skips(skips)
    if not trainer.is_global_zero:
        return {}

    results: dict[str, Any] = {"method": config.method, "backbone": config.backbone.name,
                               "data": config.data.source, "steps": trainer.global_step,
                               "global_batch_size": config.train.batch_size * world,
                               "precision": precision,
                               "lr": scaled_learning_rate(config.optim,
                                                          config.train.batch_size * world),
                               "train_seconds": round(train_seconds, 1),
                               "checkpoint": str(checkpoint_dir / "last.ckpt")}
    if resume is not None:
        results["resumed_from"] = resume
    if module.collapse_warning is not None:
        results["collapse_warning"] = module.collapse_warning
    final_loss = trainer.callback_metrics.get("train/loss")
    if final_loss is not None:
        results["final_loss"] = float(final_loss)
    plot = plot_loss_curve(sorted((out / "logs" / "csv").glob("version_*/metrics.csv")),
                           out / "loss.png")
    if plot is not None:
        results["loss_plot"] = str(plot)
    protocols = list(config.eval.after_training) if info["num_classes"] > 0 else []
    if protocols:
        trained = module.method.backbone
        random_init = build_pretraining_method(config, info).backbone
        results.update(evaluate_backbone(trained, splits, config.eval, protocols,
                                         seed=config.train.seed, skips=skips))
        bank = module.method.knn_bank()
        if bank is not None and "knn" in protocols:
            results.update(evaluate_knn_bank(*bank, splits, config.eval, skips=skips))
        results.update(evaluate_backbone(random_init, splits, config.eval, protocols,
                                         seed=config.train.seed, suffix="_random_init",
                                         skips=skips))
    if skips is not None:
        results["skipped_samples"] = skips.count
        results["skipped_examples"] = skips.problems(limit=20)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
