"""The training loop: accelerate for device, mixed precision and processes; kohya's denoising objective.

One optimizer step = ``gradient_accumulation_steps`` micro-batches (fewer for an epoch's last step). Each micro-batch: encode images (or take
cached latents), add noise at random timesteps (DDPM, kohya's schedule), predict with the UNet conditioned
on the captions, MSE against the noise (or the velocity with ``--v_parameterization``), optionally
Min-SNR weighted. Then clip (``--max_grad_norm``), step, step the lr scheduler, and report the loss to
optimizers that use it (``observe_loss``).

Randomness comes from one CPU ``torch.Generator`` (noise, timesteps, flips, caption shuffles) seeded by
``--seed``; the sample order is a pure function of (seed, epoch). The generator's state is part of the saved
state, and so is the fp16 GradScaler's (``accelerator.scaler``: loss scale, growth tracker), so ``--resume``
reproduces the uninterrupted run's losses exactly on the same machine.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import dataset as data
from . import losses, sampling
from .noise import apply_zero_terminal_snr, input_noise, training_noise
from .text_encoding import TextConditioner
from . import precision, tracking, validation
from .schedulers import build_scheduler
from .saving import (epoch_save_to_remove, load_state, model_file_name, remove_output, remove_stale_temps,
                     save_network, save_state, state_folder_name, step_save_to_remove)
from .summary import format_summary, plot_losses

SMOOTHING = 0.9


def _dtype(name: str | None):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(name or "", None)


def _min_snr_weights(scheduler, timesteps, gamma: float, v_pred: bool) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = torch.clamp(snr, max=gamma) / snr
    return weight * snr / (snr + 1) if v_pred else weight


class Trainer:
    def __init__(self, plan):
        from accelerate import Accelerator

        from .distributed import use_cpu
        from .model_loading import noise_scheduler

        self.plan = plan
        args = plan.args
        self.log_with = tracking.log_with(args)
        self.log_dir = tracking.run_log_dir(args.logging_dir, args.log_prefix) if self.log_with else None
        handlers = []
        if args.ddp_timeout:  # kohya: minutes the processes wait for each other
            import datetime

            from accelerate.utils import InitProcessGroupKwargs

            handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=self.log_with, cpu=use_cpu(),
                                       project_dir=self.log_dir, kwargs_handlers=handlers)
        self.device = self.accelerator.device
        self.scheduler = noise_scheduler()
        if args.v_parameterization:
            self.scheduler.register_to_config(prediction_type="v_prediction")
        if args.zero_terminal_snr:
            apply_zero_terminal_snr(self.scheduler)
        self.generator = torch.Generator().manual_seed(args.seed if args.seed is not None else 0)
        self.draws = self.generator  # the generator of the current micro-batch (see _micro_batch_generator)
        if args.seed is not None:
            from accelerate.utils import set_seed

            set_seed(args.seed)
        self.losses: list[float] = []
        self.smoothed = 0.0
        self.written: set[Path] = set()  # outputs this run wrote (replacing them again needs no notice)
        self.validation_losses: list[tuple[int, str, float]] = []  # (step, "step"/"epoch", loss)
        self.epoch = 1
        self.current_step = 0  # steps done before the current micro-batch (token warm-up)

    # --- set-up ----------------------------------------------------------------------------------
    def _setup_models(self):
        plan, args = self.plan, self.plan.args
        models = plan.models
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}  # frozen weights only
        models.unet.to(self.device, **cast)
        for te in models.text_encoders:
            te.to(self.device, **cast)
        self.unet_dtype = weight_dtype  # the U-Net's inputs (not unet.dtype: float8 with --fp8_base)
        if args.fp8_base or args.fp8_base_unet:  # kohya: the frozen weights in float8, computed via autocast
            precision.check_fp8_supported(self.device, weight_dtype)
            for model in [models.unet] + ([] if args.fp8_base_unet and not args.fp8_base else models.text_encoders):
                precision.cast_base_to_fp8(model)
        models.vae.to(self.device)
        plan.network.to(self.device, dtype=precision.network_dtype(args))  # --full_fp16/--full_bf16
        if args.full_fp16:
            precision.allow_fp16_gradients(self.accelerator)
        if args.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            models.unet.train()
            for te in models.text_encoders:
                te.gradient_checkpointing_enable()
                te.train()
        if args.torch_compile:  # kohya: accelerate's dynamo plugin compiles the U-Net it prepares
            models.unet = torch.compile(models.unet, backend=args.dynamo_backend)
        self.conditioner = TextConditioner(models, args.clip_skip, plan.resolution, args.max_token_length)
        self.network, self.optimizer = self.accelerator.prepare(plan.network, plan.optimizer)
        self.inner_optimizer = plan.optimizer
        self.lr_scheduler = build_scheduler(args, plan.optimizer, plan.max_train_steps)
        self.lr_tags = tracking.lr_tags(plan.param_descriptions, len(plan.optimizer.param_groups),
                                        args.network_train_unet_only)

    def _cache_latents(self):
        plan = self.plan
        self.latent_cache = None
        if not plan.args.cache_latents:
            return
        from . import latent_cache

        self.latent_cache, counts = latent_cache.build(plan.spec.items, plan.models.vae, self.draws, self.device,
                                                       plan.args.cache_latents_to_disk, plan.models.is_sdxl,
                                                       plan.args.skip_cache_check, plan.args.vae_batch_size)
        if plan.args.cache_latents_to_disk:
            print(f"latents cached to disk: {counts['encoded']} encoded, {counts['reused']} reused (.npz beside the images)")

    def _cache_text_encoder_outputs(self):
        args = self.plan.args
        if not args.cache_text_encoder_outputs:
            return
        from .text_encoding import cache_outputs

        fixed = torch.Generator()  # cacheable captions draw nothing (text_encoding.check_cacheable)
        counts = cache_outputs(self.plan.spec.items, self.conditioner, self.device,
                               args.cache_text_encoder_outputs_to_disk,
                               lambda it: data.process_caption(it.caption, it.subset, fixed),
                               skip_check=args.skip_cache_check)
        print(f"text encoder outputs cached: {counts['encoded']} encoded, {counts['reused']} reused")

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The batch's latents; the VAE sees at most ``--vae_batch_size`` images at a time (kohya), and the
        sampling noise is drawn for the whole batch, so the result does not depend on that size."""
        vae = self.plan.models.vae
        size = self.plan.args.vae_batch_size
        dists = [vae.encode(chunk.float()).latent_dist for chunk in pixels.split(size or len(pixels))]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
        noise = torch.randn(mean.shape, generator=self.draws).to(self.device)
        return (mean + std * noise) * vae.config.scaling_factor

    def _micro_batch_generator(self, index: int) -> torch.Generator:
        """The draws of micro-batch ``index`` (counted over all processes since the start of training).

        A function of (seed, index) alone: under data parallel each rank draws its own micro-batch's noise,
        timesteps, flips and caption shuffles exactly as a single process with the same global batch
        (``--gradient_accumulation_steps`` = number of processes) would, instead of every rank repeating
        rank 0's draws; and a resumed run draws as the uninterrupted one did.
        """
        seed = self.plan.args.seed if self.plan.args.seed is not None else 0
        return torch.Generator().manual_seed((seed * 2_654_435_761 + index * 40_503 + 0x5EED) % (1 << 63))

    # --- one micro-batch -------------------------------------------------------------------------
    def _batch(self, indices: list[int]):
        plan = self.plan
        items = [plan.spec.items[i] for i in indices]
        self.batch_items = items  # _loss weighs regularisation images by --prior_loss_weight
        flips = [it.subset.flip_aug and bool(torch.rand((), generator=self.draws) < 0.5) for it in items]
        captions = [data.process_caption(it.caption, it.subset, self.draws, self.epoch, self.current_step,
                                         plan.max_train_steps) for it in items]
        self.batch_masks = None
        with_masks = any(it.subset.alpha_mask for it in items)
        if self.latent_cache is not None:
            latents = self.latent_cache.batch(indices, flips).to(self.device)
            if with_masks:  # cached images have the centre crop (random_crop cannot be cached)
                masks = [data.load_item_with_mask(it)[1] for it in items]
                self.batch_masks = torch.stack([m.flip(-1) if f else m for m, f in zip(masks, flips)])
        elif with_masks:
            pairs = [data.load_item_with_mask(it, self.draws) for it in items]  # the draws of load_item
            pixels = torch.stack([p.flip(-1) if f else p for (p, _), f in zip(pairs, flips)]).to(self.device)
            self.batch_masks = torch.stack([m.flip(-1) if f else m for (_, m), f in zip(pairs, flips)])
            with torch.no_grad():
                latents = self._encode(pixels)
        else:
            pixels = torch.stack([data.load_item(it, self.draws) for it in items])  # draws: random_crop
            pixels = torch.stack([p.flip(-1) if f else p for p, f in zip(pixels, flips)]).to(self.device)
            with torch.no_grad():
                latents = self._encode(pixels)
        return latents, captions

    def _loss(self, latents: torch.Tensor, captions: list[str]) -> torch.Tensor:
        args = self.plan.args
        models = self.plan.models
        b = latents.shape[0]
        noise = training_noise(latents, args, self.draws)
        t_min = args.min_timestep or 0
        t_max = args.max_timestep or self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(t_min, t_max, (b,), generator=self.draws)
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = self.scheduler.add_noise(latents, input_noise(noise, args, self.draws), timesteps)
        with self.accelerator.autocast():
            with torch.set_grad_enabled(self.plan.train_text_encoder):
                hidden, added = self.conditioner(captions, self.device, self.batch_items)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            pred = models.unet(noisy.to(self.unet_dtype), timesteps, hidden.to(self.unet_dtype), **kwargs).sample
        target = self.scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise
        c = None
        if args.loss_type in ("huber", "smooth_l1"):
            c = losses.huber_c(timesteps, self.scheduler.alphas_cumprod, args.huber_schedule, args.huber_c,
                               args.huber_scale, self.scheduler.config.num_train_timesteps)
        loss = losses.elementwise_loss(pred.float(), target.float(), args.loss_type, c)
        if getattr(self, "batch_masks", None) is not None:  # --alpha_mask (kohya: alpha masks imply the masked loss)
            loss = losses.masked(loss, self.batch_masks)
        loss = loss.mean(dim=(1, 2, 3))
        loss = loss * losses.prior_weights(self.batch_items, args.prior_loss_weight).to(loss.device)
        if args.min_snr_gamma:
            loss = loss * _min_snr_weights(self.scheduler, timesteps, args.min_snr_gamma, args.v_parameterization)
        if args.scale_v_pred_loss_like_noise_pred:
            loss = loss * losses.snr_scale(timesteps, self.scheduler.alphas_cumprod)
        if args.v_pred_like_loss:
            loss = losses.v_pred_like_loss(loss, timesteps, self.scheduler.alphas_cumprod, args.v_pred_like_loss)
        if args.debiased_estimation_loss:
            loss = loss * losses.debiased_weights(timesteps, self.scheduler.alphas_cumprod, args.v_parameterization)
        return loss.mean()

    def _max_norm_regularization(self) -> dict:
        """``--scale_weight_norms``: kohya's max-norm step after each update; its figures, for the log."""
        if not self.plan.args.scale_weight_norms:
            return {}
        scaled, mean_norm, max_norm = losses.apply_max_norm(self.accelerator.unwrap_model(self.network),
                                                            self.plan.args.scale_weight_norms)
        return {"max_norm/keys_scaled": scaled, "max_norm/max_key_norm": max_norm, "norm/avg_key_norm": mean_norm}

    # --- saving ----------------------------------------------------------------------------------
    def _metadata(self, step: int, epoch: int) -> dict | None:
        from .metadata import kohya_metadata

        if self.plan.args.no_metadata:
            return None
        return kohya_metadata(self.plan, self.inner_optimizer, step, epoch, self.started_at)

    def _save(self, step: int, epoch: int, *, final: bool, by_epoch: bool = False):
        if not self.accelerator.is_main_process:
            return None
        plan, args = self.plan, self.plan.args
        optimizer_eval = getattr(self.inner_optimizer, "eval", None)
        if callable(optimizer_eval):  # schedule-free optimizers save their averaged weights
            optimizer_eval()
        ext = args.save_model_as
        where = {} if final else {"epoch": epoch} if by_epoch else {"step": step}
        path = plan.output_dir / model_file_name(plan.output_name, ext=ext, **where)
        self._note_overwrite(path)
        network = self.accelerator.unwrap_model(self.network)
        save_network(network, path, _dtype(args.save_precision), self._metadata(step, epoch))
        with_state = args.save_state or (final and args.save_state_on_train_end)
        if with_state:
            folder = plan.output_dir / state_folder_name(plan.output_name, **where)
            self._note_overwrite(folder)
            save_state(folder, network, self.inner_optimizer, self.lr_scheduler, self.generator,
                       {"global_step": step, "epoch": epoch, "losses": self.losses, "smoothed": self.smoothed,
                        "max_train_steps": plan.max_train_steps, "seed": args.seed},
                       scaler=self.accelerator.scaler)
        if not final:  # --save_last_n_epochs / --save_last_n_steps (and their _state forms), as kohya
            if by_epoch:
                every = args.save_every_n_epochs
                old_file = epoch_save_to_remove(epoch, every, args.save_last_n_epochs)
                old_state = epoch_save_to_remove(epoch, every, args.save_last_n_epochs_state or args.save_last_n_epochs)
                key = "epoch"
            else:
                every = args.save_every_n_steps
                old_file = step_save_to_remove(step, every, args.save_last_n_steps)
                old_state = step_save_to_remove(step, every, args.save_last_n_steps_state or args.save_last_n_steps)
                key = "step"
            if old_file is not None:
                remove_output(plan.output_dir / model_file_name(plan.output_name, ext=ext, **{key: old_file}))
            if old_state is not None and with_state:
                remove_output(plan.output_dir / state_folder_name(plan.output_name, **{key: old_state}))
        optimizer_train = getattr(self.inner_optimizer, "train", None)
        if callable(optimizer_train):
            optimizer_train()
        return path

    def _validate(self, step: int, kind: str) -> None:
        """The held-out images' loss (``validation.py``), logged as kohya names it and printed."""
        if not self.plan.validation_indices:
            return
        loss = validation.validation_loss(self, self.plan.validation_indices)
        self.validation_losses.append((step, kind, loss))
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"validation loss ({kind} {step}): {loss:.4f}")
        if self.log_with:
            self.accelerator.log({f"loss/validation/{kind}_average": loss}, step=step)

    def _note_overwrite(self, path: Path) -> None:
        """One line when a save replaces a file or state folder that this run did not write (an earlier run's)."""
        if path.exists() and path not in self.written:
            print(f"note: {path} exists (an earlier run's?); it is replaced")
        self.written.add(path)

    def _average_gradients(self) -> None:
        """Average the network's gradients over the processes (data parallel).

        The LoRA/LoKr network works by patching the base model's forward, so the DDP wrapper accelerate puts
        around it never runs its own forward and its reducer never fires: without this every rank would
        train on its own gradients and the ranks would drift apart. A gradient that is None on every rank
        stays None (module dropout skips); one that is None on some ranks counts as zero there.
        """
        nproc = self.accelerator.num_processes
        if nproc == 1:
            return
        import torch.distributed as dist

        params = [p for p in self.accelerator.unwrap_model(self.network).parameters() if p.requires_grad]
        if not params:
            return
        device = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        dist.all_reduce(has)
        params = [p for p, n in zip(params, has.tolist()) if n > 0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= nproc
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def _report_skips(self, step: int) -> None:
        """Say when the optimizer skipped tensors this step (non-finite gradients; counted in its groups)."""
        skipped = _skipped_updates(self.inner_optimizer)
        if skipped > self.skipped_seen:
            from tqdm.auto import tqdm

            if self.accelerator.is_main_process:
                tqdm.write(f"warning: step {step}: the optimizer skipped {skipped - self.skipped_seen} tensor "
                           f"update(s) with non-finite gradients (weights and state of those tensors unchanged; "
                           f"{skipped} in this run so far)")
            self.skipped_seen = skipped

    def _initial_step(self, global_step: int, epoch_updates: int) -> tuple[int, int]:
        """(first step, epoch offset) with kohya's ``--initial_step``/``--initial_epoch``.

        With ``--skip_until_initial_step`` training starts at that step: the earlier steps' data is passed over
        and steps, epochs and file names continue from there. Without it (kohya: "only the epoch number is
        skipped") steps count from 0 while epochs are numbered from the initial one, and the run ends with the
        planned epochs. The lr schedule is not moved in either case (it starts at 0 unless ``--resume``).
        """
        plan, args = self.plan, self.plan.args
        if plan.initial_step is None:
            return global_step, 0
        if plan.resume_state is not None:
            print(f"note: --initial_step/--initial_epoch given: the resumed state's step {global_step} is ignored")
        self.losses = []
        self.smoothed = 0.0
        if args.skip_until_initial_step:
            print(f"skipping {plan.initial_step} steps (their data is passed over, not trained)")
            return plan.initial_step, 0
        return 0, plan.initial_step // epoch_updates

    # --- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        plan, args = self.plan, self.plan.args
        self._setup_models()
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            for stale in remove_stale_temps(plan.output_dir):
                print(f"note: removed {stale.name}, a temp file an interrupted earlier run left in {plan.output_dir}")
        if self.log_with:
            self.accelerator.init_trackers(args.log_tracker_name or tracking.DEFAULT_TRACKER_NAME,
                                           config=tracking.hparams(args),
                                           init_kwargs=tracking.tracker_init_kwargs(args.log_tracker_config)
                                           if args.log_tracker_config else {})
            print(f"logging to {self.log_dir} (TensorBoard: tensorboard --logdir {args.logging_dir})")
        global_step = 0
        self._cache_latents()  # before loading a state: the cache must equal the saved run's (same draws)
        self._cache_text_encoder_outputs()
        if plan.resume_state is not None:
            load_state(Path(args.resume), self.accelerator.unwrap_model(self.network), self.inner_optimizer,
                       self.lr_scheduler, self.generator, scaler=self.accelerator.scaler)
            global_step = int(plan.resume_state["global_step"])
            self.losses = list(plan.resume_state.get("losses", []))[:global_step]
            self.smoothed = float(plan.resume_state.get("smoothed", 0.0))
            print(f"resumed from {args.resume} at step {global_step}")
        self.started_at = time.time()
        self.skipped_seen = _skipped_updates(self.inner_optimizer)

        accum = args.gradient_accumulation_steps
        per_epoch = plan.epochs.batches_per_epoch
        nproc, rank = self.accelerator.num_processes, self.accelerator.process_index
        rounds = math.ceil(per_epoch / nproc)  # micro-batches per epoch on each process
        epoch_updates = updates_per_epoch(per_epoch, accum, nproc)
        global_step, epoch_offset = self._initial_step(global_step, epoch_updates)
        epochs_ran_out = False
        bar = tqdm(total=plan.max_train_steps, initial=global_step, desc="steps", dynamic_ncols=True,
                   disable=not self.accelerator.is_local_main_process, mininterval=0.5)
        self.network.train()
        last_path = None
        start = time.time()
        start_step = global_step
        shown_group = tracking.shown_lr_index(self.lr_tags)
        self.sample_paths = sampling.sample_images(self, global_step, 0)  # --sample_at_first
        while global_step < plan.max_train_steps:
            epoch, first_update = divmod(global_step, epoch_updates)
            epoch += epoch_offset
            epochs_ran_out = epoch >= plan.num_epochs  # --initial_epoch without --skip_until_initial_step
            if epochs_ran_out:
                break
            batches = plan.epochs.batches(epoch)
            self.epoch = epoch + 1  # kohya counts epochs from 1 (caption_dropout_every_n_epochs)
            for update in range(first_update, epoch_updates):
                # an update is ``accum`` micro-batches, fewer at the end of an epoch: like accelerate's
                # gradient accumulation (sync_with_dataloader), an epoch always ends with a finished update
                first, last = update * accum, min(update * accum + accum, rounds)
                step_loss = 0.0
                self.current_step = global_step
                for r in range(first, last):
                    j = r * nproc + rank
                    indices = batches[j] if j < per_epoch else batches[j % per_epoch]
                    sync = r == last - 1
                    self.draws = self._micro_batch_generator(epoch * per_epoch + r * nproc + rank)
                    latents, captions = self._batch(indices)
                    ctx = self.accelerator.no_sync(self.network) if not sync else _nullcontext()
                    with ctx:
                        loss = self._loss(latents, captions)
                        self.accelerator.backward(loss / accum)  # accelerate's scaling, short updates included
                    step_loss += loss.detach().float().item() / (last - first)  # the update's mean loss
                self._average_gradients()
                if args.max_grad_norm and args.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self.network.parameters(), args.max_grad_norm)
                observe = getattr(self.inner_optimizer, "observe_loss", None)
                if callable(observe):
                    observe(step_loss)
                self.optimizer.step()
                self._report_skips(global_step + 1)
                lrs = self.lr_scheduler.get_last_lr()  # the lrs this update used
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                norm_logs = self._max_norm_regularization()
                global_step += 1
                self.losses.append(step_loss)
                n = len(self.losses)
                self.smoothed = SMOOTHING * self.smoothed + (1 - SMOOTHING) * step_loss
                shown = self.smoothed / (1 - SMOOTHING ** n)
                bar.update(1)
                bar.set_postfix(loss=f"{shown:.4f}", lr=f"{lrs[shown_group]:.2e}", refresh=False)
                if self.log_with:
                    logs = {"loss/current": step_loss, "loss/average": shown}
                    logs.update({tag: float(lr) for tag, lr in zip(self.lr_tags, lrs)})
                    logs.update(norm_logs)
                    self.accelerator.log(logs, step=global_step)
                self.sample_paths += sampling.sample_images(self, global_step, None)
                if validation.should_validate_step(args, global_step):
                    self._validate(global_step, "step")
                if args.save_every_n_steps and global_step % args.save_every_n_steps == 0 \
                        and global_step < plan.max_train_steps:
                    self.accelerator.wait_for_everyone()
                    self._save(global_step, epoch + 1, final=False)
                if global_step >= plan.max_train_steps:
                    break
            else:
                self.sample_paths += sampling.sample_images(self, global_step, epoch + 1)
                if validation.should_validate_epoch(args, epoch + 1):
                    self._validate(global_step, "epoch")
                if args.save_every_n_epochs and (epoch + 1) % args.save_every_n_epochs == 0 \
                        and global_step < plan.max_train_steps:
                    self.accelerator.wait_for_everyone()
                    self._save(global_step, epoch + 1, final=False, by_epoch=True)
        bar.close()
        final_epoch = math.ceil(global_step / epoch_updates) + epoch_offset
        if global_step > start_step and not epochs_ran_out:  # the last epoch ends here (kohya samples at every epoch's end)
            self.sample_paths += sampling.sample_images(self, global_step, final_epoch)
            if validation.should_validate_epoch(args, final_epoch):
                self._validate(global_step, "epoch")
        seconds = time.time() - start
        self.accelerator.wait_for_everyone()
        final_epoch = min(final_epoch, plan.num_epochs)
        last_path = self._save(global_step, final_epoch, final=True)
        plot_path = None
        if self.accelerator.is_main_process and self.losses:
            plot_path = plan.output_dir / f"{plan.output_name}_loss.png"
            plot_losses(self.losses, plot_path, f"{plan.output_name}: {args.optimizer_type}, {plan.network_module}")
        info = getattr(self.inner_optimizer, "get_optimization_info", None)
        info = info() if callable(info) else {"optimizer_type": type(self.inner_optimizer).__name__}
        if self.accelerator.is_main_process:
            print(format_summary(steps=global_step - start_step, seconds=seconds, losses=self.losses,
                                 output=last_path, plot=plot_path, optimizer_info=info,
                                 samples=self.sample_paths))
        if self.log_with:
            self.accelerator.end_training()
        return {"losses": list(self.losses), "output": last_path, "plot": plot_path, "seconds": seconds,
                "global_step": global_step, "optimizer_info": info, "validation": list(self.validation_losses)}


def updates_per_epoch(batches_per_epoch: int, accum: int, num_processes: int = 1) -> int:
    """Optimizer steps per epoch (kohya: ceil(batches / processes / accumulation); the last may be short)."""
    return math.ceil(math.ceil(batches_per_epoch / num_processes) / accum)


def _skipped_updates(optimizer) -> int:
    """Tensor updates the optimizer skipped so far (Hina optimizers count them per param group)."""
    return sum(int(g.get("skipped_updates", 0)) for g in getattr(optimizer, "param_groups", []))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train(plan) -> dict:
    return Trainer(plan).train()
