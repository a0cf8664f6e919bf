"""``TEMoEPrecision``: the Lightning precision plugin. Thin hooks over environment -> policy -> plan -> state."""

from __future__ import annotations

import dataclasses
import functools
import os
from contextlib import AbstractContextManager, ExitStack
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision, Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from .compiled import compiled_modules
from .console import print_rank_zero
from .distributed.sharding import fsdp_mixed_precision, fsdp_wrap_policy, is_sharded, ready_for_sharding
from .distributed.strategies import amax_reduction_group, distributed_reasons, strategy_support
from .guard import DecisionLog, DivergenceGuard, GuardConfig, attach_sinks
from .memory import MemoryFallback
from .policy import (
    Environment,
    Plan,
    PrecisionRequest,
    PrecisionState,
    make_plan,
    probe_environment,
)
from .policy.recipes import RECIPE_NAMES, RecipeName, spec_from_te_recipe
from .validation import check_bool, check_choice, check_positive_int, check_recipe_names, dataclass_from

RecipeChoice = Literal["auto", "bf16", "fp16", "fp32", "fp8_delayed", "fp8_current", "fp8_block", "mxfp8", "nvfp4"]

#: Lightning's precision string for each recipe family (``trainer.precision``).
_LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


class TERecipe:
    """Type stand-in for a ``transformer_engine.common.recipe.Recipe`` instance passed from Python."""


class TEMoEPrecision(FSDPPrecision):
    """Train MoE models with Transformer Engine in the best precision the machine runs, and explain why.

    At setup it probes the device and TE/cuDNN/CUDA versions, makes a :class:`~lightning_te_moe.policy.plan.Plan`
    from the rules table, prints it, and runs forward passes under the plan's current rung (TE ``autocast``
    for quantized recipes, torch autocast for the compute dtype). The rung is saved in checkpoints.

    Args:
        recipe: ``"auto"``, a recipe name, or a TE recipe object.
        allow: recipe names the plan may use (empty: all).
        deny: recipe names the plan must not use.
        auto_nvfp4: let ``auto`` choose NVFP4 where the device runs it.
        prefer_stability: ``auto`` avoids delayed scaling and NVFP4 and starts with a high-precision backward.
        strict: a requested recipe the device cannot run is an error; with False the plan steps down.
        params_dtype: dtype the trainable parameters are kept in (the optimizer's master weights); frozen
            parameters keep their own dtype unless the ladder has an FP32 rung.
        print_plan: print the plan table at setup (rank 0).
        swap_experts: replace every recognised MoE experts module by grouped-GEMM experts at setup (TE
            ``GroupedLinear`` on CUDA); the swap report is printed (rank 0) and recorded as a decision.
        cache_quantized_weights: under FP8, TE keeps the swapped experts' quantized weights while they are
            unchanged (gradient-accumulation micro-batches, frozen experts: quantized once); False quantizes on
            every forward and holds no FP8 weight copy between steps (docs/experts.md).
        swap_attention: run attention cores on TE's fused ``DotProductAttention`` (GPT-OSS sinks: learnable
            softmax; Mixtral/Qwen3-MoE: vanilla) where the plan allows fused attention on CUDA with TE; attention
            with different q/k and v head sizes (DeepSeek MLA) and every other case keep the model's own,
            with the reason printed (rank 0) and recorded as a decision.
        swap_dense: run dense linear layers (attention projections, shared experts, dense MLPs) on TE's
            ``te.Linear`` where the plan runs a quantized dense recipe on CUDA with TE; routers, the output head,
            embeddings and layers TE cannot run stay as they are, with the reason (docs/dense.md).
        swap_norms: run RMSNorms on TE's fused kernels (one kernel forward, one backward) on CUDA with TE, where
            TE's kernel is the model's own math (GPT-OSS); other norms stay the model's own, with the reason
            (:mod:`lightning_te_moe.norms`).
        guard: watch for divergence and step down the ladder / roll back / stop (attaches a
            :class:`~lightning_te_moe.guard.DivergenceGuard` callback to the Trainer).
        guard_config: the guard's thresholds and limits: a :class:`~lightning_te_moe.guard.config.GuardConfig`, or a
            dict of its fields (converted, so Python and YAML take the same form; an unknown field is an error).
        autotune: with ``recipe="auto"`` on a GPU with TE, time the recipes the plan allows on the model's
            largest swapped experts module at the first training step and start on the fastest (the timings
            are a recorded decision); otherwise the rule-based plan stands.
        autotune_tokens: tokens per timed expert-layer call (use the run's tokens per micro-batch).
        cuda_graphs: replay each decoder layer's training forward and backward as CUDA graphs where the layer
            makes no host synchronization (:mod:`lightning_te_moe.graphs`): the step stops waiting on the host's
            kernel launches. Layers that synchronize run eagerly, with the reason recorded. None (default): the
            plan decides: on for one process on CUDA with TE, off under DDP/FSDP, torch.compile and on the CPU
            (rules ``cuda-graphs-*``, docs/policy.md). Each input shape keeps a memory pool of its own: train at a
            few fixed shapes; a step out of memory recomputes inside them or drops them (``memory_fallback``).
            docs/cuda-graphs.md.
        memory_fallback: a training step out of GPU memory recomputes inside the CUDA graphs or drops them (the
            plan says which: rules ``graphed-recompute-*``), then turns on activation checkpointing, and runs
            again on the same batch, each change a recorded decision
            (:mod:`lightning_te_moe.memory`; one process, automatic optimization, no gradient accumulation); False
            lets the error end the run.

    Strategies (docs/distributed.md): single device, DDP, ``FSDPStrategy`` and ``ModelParallelStrategy`` (FSDP2: call
    :func:`lightning_te_moe.distributed.shard_model` in ``configure_model``); any other is an error at setup. The class
    derives from ``FSDPPrecision`` only because Lightning's ``FSDPStrategy`` accepts no other precision plugin; it
    overrides every hook ``FSDPPrecision`` defines, so under the other strategies it is a plain ``Precision``.
    """

    precision: str = "32-true"

    def __init__(
        self,
        recipe: Union[RecipeChoice, TERecipe] = "auto",
        *,
        allow: Optional[list[RecipeName]] = None,
        deny: Optional[list[RecipeName]] = None,
        auto_nvfp4: bool = False,
        prefer_stability: bool = False,
        strict: bool = True,
        params_dtype: Literal["float32", "bfloat16"] = "float32",
        print_plan: bool = True,
        swap_experts: bool = True,
        cache_quantized_weights: bool = True,
        swap_attention: bool = True,
        swap_dense: bool = True,
        swap_norms: bool = True,
        guard: bool = True,
        guard_config: Optional[GuardConfig] = None,
        autotune: bool = False,
        autotune_tokens: int = 16384,
        cuda_graphs: Optional[bool] = None,
        memory_fallback: bool = True,
    ) -> None:
        _check_arguments(recipe, params_dtype, auto_nvfp4=auto_nvfp4, prefer_stability=prefer_stability,
                         strict=strict, print_plan=print_plan, swap_experts=swap_experts,
                         cache_quantized_weights=cache_quantized_weights, swap_attention=swap_attention,
                         swap_dense=swap_dense, swap_norms=swap_norms, guard=guard, autotune=autotune,
                         memory_fallback=memory_fallback)
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise TypeError(f"{_OWNER}(cuda_graphs={cuda_graphs!r}): cuda_graphs must be None (the plan decides), True"
                            f" or False, got {type(cuda_graphs).__name__}")
        self.request = PrecisionRequest(recipe=recipe, allow=check_recipe_names(_OWNER, "allow", allow),
                                        deny=check_recipe_names(_OWNER, "deny", deny), auto_nvfp4=auto_nvfp4,
                                        prefer_stability=prefer_stability, strict=strict, params_dtype=params_dtype,
                                        cuda_graphs=cuda_graphs)
        self.params_dtype = getattr(torch, params_dtype)
        self.print_plan = print_plan
        self._plan_printed = False
        self.autotune_tokens = check_positive_int(_OWNER, "autotune_tokens", autotune_tokens, "tokens")
        self._autotune_pending = autotune
        self._model: Optional[torch.nn.Module] = None
        self.guard_enabled = guard
        self.guard_config = dataclass_from(_OWNER, "guard_config", guard_config, GuardConfig) or GuardConfig()
        self.guard: Optional[DivergenceGuard] = None
        self._guard_state: Optional[dict[str, Any]] = None
        self._sinks_trainer: Any = None
        self.state: Optional[PrecisionState] = None
        self.decisions = DecisionLog()
        self.memory = MemoryFallback(self.decisions, memory_fallback)
        self._device_type = "cpu"
        self._amp: Optional[MixedPrecision] = None
        self._trainer: Any = None
        self._resume_step: Optional[int] = None
        self._converted: Optional[torch.nn.Module] = None  # the module last planned, swapped and cast
        self._sharded = False  # the Trainer's strategy shards the parameters over several ranks (set at planning)
        self._processes = 1  # the run's processes (set at planning)
        #: Module swaps run at setup, in order: ``fn(model, state) -> (summary, details) or None``.
        self.module_swaps: list[Callable[[torch.nn.Module, PrecisionState], Optional[tuple[str, dict]]]] = []
        if swap_experts:
            from .experts import ExpertSwapConfig, swap_for_plugin

            config = ExpertSwapConfig(cache_quantized_weights=cache_quantized_weights)
            self.module_swaps.append(functools.partial(swap_for_plugin, config=config))
        if swap_attention:
            from .attention import swap_for_plugin as swap_attention_for_plugin

            self.module_swaps.append(swap_attention_for_plugin)
        if swap_dense:
            from .dense import DenseSwapConfig, swap_for_plugin as swap_dense_for_plugin

            config = DenseSwapConfig(cache_quantized_weights=cache_quantized_weights)
            self.module_swaps.append(functools.partial(swap_dense_for_plugin, config=config))
        if swap_norms:
            from .norms import swap_for_plugin as swap_norms_for_plugin

            self.module_swaps.append(swap_norms_for_plugin)
        from .recompute import recompute_for_plugin

        self.module_swaps.append(recompute_for_plugin)  # after the swaps: checkpointed layers recompute on TE too
        if cuda_graphs is not False:  # installed where the plan says (plan.cuda_graphs)
            from .graphs import install_for_plugin

            self.module_swaps.append(functools.partial(install_for_plugin, decisions=self.decisions))

    # -- planning -------------------------------------------------------------------------------
    def make_plan(self, device: torch.device, torch_compile: bool = False,
                  environment: Optional[Environment] = None, sharded: bool = False, processes: int = 1) -> Plan:
        """Probe ``device`` (unless an environment is given) and plan; does not change the plugin. ``sharded``: the
        Trainer's strategy shards the parameters over several ranks; ``processes``: the run's (rules differ)."""
        env = environment or probe_environment(device)
        request = dataclasses.replace(self.request, torch_compile=torch_compile, sharded=sharded, processes=processes)
        return make_plan(env, request)

    @property
    def plan(self) -> Optional[Plan]:
        return self.state.plan if self.state else None

    def _set_up(self, plan: Plan, device: torch.device) -> None:
        self._device_type = device.type
        self.state = PrecisionState(plan)
        self.memory.graphed_recompute = plan.graphed_recompute
        self.state.on_change(lambda old, new: self._sync_precision_label())
        self._sync_precision_label()
        os.environ.update(plan.env_vars)
        if device.type == "cuda" and any(r.dense.name == "fp16" for r in plan.ladder):
            self._amp = MixedPrecision("16-mixed", device="cuda")
        self.decisions.environment = plan.environment.summary()
        self.decisions.record("plan", f"start on {plan.ladder[0].label()}; ladder {plan.summary()}",
                              to=plan.ladder[0].label(), rule="policy",
                              evidence={"reasons": [r.to_dict() for r in plan.reasons]})

    def _sync_precision_label(self) -> None:
        assert self.state is not None
        dense = self.state.dense.name
        self.precision = "transformer-engine" if self.state.dense.is_te else _LIGHTNING_PRECISION[dense]

    # -- Lightning hooks ------------------------------------------------------------------------
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Plan on the real device, run the module swaps, cast parameters. Changes ``module`` in place.

        A module prepared in ``configure_model`` (:meth:`prepare_for_sharding`) is already all of that; one sharded
        before the plugin could swap and cast it is an error (the swaps cannot replace sharded modules).
        """
        trainer = getattr(module, "_trainer", None)
        support = strategy_support(trainer.strategy) if trainer is not None else None
        if is_sharded(module):
            if self._converted is module:  # prepared in configure_model, or a later stage of the same Trainer
                if trainer is not None:
                    self._attach_to(trainer)
                return module
            raise RuntimeError(
                f"{type(module).__name__} was sharded (FSDP / fully_shard / tensor parallel) before TEMoEPrecision"
                " could plan, swap and cast it, and sharded modules cannot be swapped: in configure_model call"
                " lightning_te_moe.distributed.shard_model(self), or prepare_model(self) before your own fully_shard")
        self._trainer = trainer
        self._model = module
        if self.state is None:
            if trainer is not None and trainer.ckpt_path:  # resuming: the checkpoint's history may replace the
                self.decisions.hold()                      # setup records (on_load_checkpoint decides)
            device = trainer.strategy.root_device if trainer is not None else _default_device()
            compiled = bool(compiled_modules(module))
            world = trainer.world_size if trainer is not None else _process_count()
            self._sharded = world > 1 and support is not None and support.kind in ("fsdp", "fsdp2")
            self._processes = world
            plan = self.make_plan(device, torch_compile=compiled, sharded=self._sharded, processes=world)
            if world > 1:  # every rank runs rank 0's plan (the Trainer's strategy broadcasts; Fabric: the group)
                plan = Plan.from_dict(_broadcast(trainer, plan.to_dict()))
                plan = dataclasses.replace(plan, reasons=plan.reasons + distributed_reasons(plan, self._sharded,
                                                                                            world))
            self._set_up(plan, device)
        assert self.state is not None
        for swap in self.module_swaps:
            result = swap(module, self.state)
            if result is not None:
                summary, details = result
                self.decisions.record("swap", summary, rule="swap", evidence=details)
        if trainer is not None:
            self._attach_to(trainer)
        if self.print_plan and not self._plan_printed:
            self._print_plan(module)
        self._cast_parameters(module)
        if support is not None and support.kind == "fsdp":
            ready_for_sharding(module)
            self._set_fsdp_wrapping(trainer.strategy, module)
        self._converted = module
        return module

    def prepare_for_sharding(self, module: torch.nn.Module) -> None:
        """Plan, swap and cast ``module`` before it is sharded (called from ``configure_model`` through
        :func:`lightning_te_moe.distributed.prepare_model`); the strategy's later ``convert_module`` keeps it."""
        if self._converted is not module:
            self.convert_module(module)
        ready_for_sharding(module)

    def record_sharding(self, summary: str, details: dict[str, Any]) -> None:
        """Record how the model was sharded (a ``shard`` decision)."""
        self.decisions.record("shard", summary, rule="sharding", evidence=details)

    def _set_fsdp_wrapping(self, strategy: Any, module: torch.nn.Module) -> None:
        """FSDP (v1) units: each GroupedExperts module and decoder layer, unless the user chose a policy."""
        if "auto_wrap_policy" in strategy.kwargs:
            self.record_sharding("FSDP: the strategy's own auto_wrap_policy decides the units",
                                 {"strategy": "fsdp", "policy": "user"})
            return
        policy = fsdp_wrap_policy(module)
        strategy.kwargs["auto_wrap_policy"] = policy
        names = sorted(cls.__name__ for cls in policy._module_classes)
        self.record_sharding(f"FSDP: one unit per {', '.join(names)} module (no auto_wrap_policy was given)",
                             {"strategy": "fsdp", "policy": names})

    def _cast_parameters(self, module: torch.nn.Module) -> None:
        """Trainable parameters (the optimizer's master weights) and buffers go to ``params_dtype``.

        Frozen parameters keep their dtype while every rung of the ladder runs under autocast: they have no master
        weights, and casting a frozen BF16 base to FP32 would double its memory for nothing (a 20B model's experts:
        38 GB more). A ladder with an FP32 rung (no autocast) casts them too, since plain FP32 math cannot take
        BF16 weights.
        """
        assert self.state is not None
        if any(rung.dense.name == "fp32" for rung in self.state.plan.ladder):
            module.to(dtype=self.params_dtype)
            return
        for param in module.parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != self.params_dtype:
                param.data = param.data.to(self.params_dtype)
        for buffer_owner in module.modules():
            for name, buffer in buffer_owner.named_buffers(recurse=False):
                if buffer.is_floating_point() and buffer.dtype != self.params_dtype:
                    setattr(buffer_owner, name, buffer.to(self.params_dtype))

    def _print_plan(self, module: torch.nn.Module) -> None:
        """The plan table (rank 0), after the swaps: the experts row only where the model has swapped experts."""
        from .experts import GroupedExperts

        assert self.state is not None
        self._plan_printed = True
        print_rank_zero(self.state.plan.render(experts=any(isinstance(m, GroupedExperts) for m in module.modules())))
        rank_zero_info(f"[lightning-te-moe] plan: {self.state.plan.summary()}")

    def _attach_to(self, trainer: Any) -> None:
        """Decision sinks for this Trainer, and the guard callback (before checkpointing callbacks, so a
        checkpoint never holds weights the guard is about to roll back)."""
        assert self.state is not None
        if self._sinks_trainer is not trainer:  # setup runs again for each fit/validate/test: attach once
            attach_sinks(self.decisions, trainer, self.state)
            self._sinks_trainer = trainer
        if not self.guard_enabled:
            return
        if self.guard is None:
            self.guard = DivergenceGuard(self.state, self.decisions, self.guard_config, self._scaler_active,
                                         scaler=self._amp.scaler if self._amp is not None else None)
            if self._guard_state is not None:
                self.guard.load_guard_state(self._guard_state)
        if self.guard not in trainer.callbacks:
            checkpoints = [i for i, cb in enumerate(trainer.callbacks) if cb in trainer.checkpoint_callbacks]
            trainer.callbacks.insert(checkpoints[0] if checkpoints else len(trainer.callbacks), self.guard)

    def train_step_context(self) -> AbstractContextManager:
        """Each training step: a graphed forward left without its backward last step is abandoned."""
        if self._model is not None:
            from .graphs import release_pending

            release_pending(self._model)
        return super().train_step_context()

    def forward_context(self) -> AbstractContextManager:
        """torch autocast for the compute dtype, TE autocast for a quantized dense recipe."""
        stack = ExitStack()
        if self.state is None:
            return stack
        if self._autotune_pending and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            self._run_autotune()
        dense = self.state.dense
        if dense.name != "fp32":
            stack.enter_context(torch.autocast(self._device_type, dtype=dense.compute_dtype, cache_enabled=False))
        if dense.is_te:
            import transformer_engine.pytorch as te

            stack.enter_context(te.autocast(enabled=True, recipe=self.state.te_recipe(dense),
                                            amax_reduction_group=amax_reduction_group(dense.name)))
        return stack

    def _run_autotune(self) -> None:
        """Time the allowed recipes on the real expert shapes (once, at the first training step, on the device)
        and start on the fastest; every rank takes rank 0's choice."""
        from .policy.autotune import autotune_model

        assert self.state is not None and self._model is not None
        self._autotune_pending = False
        trainer, step = self._trainer, getattr(self._trainer, "global_step", 0)
        request = dataclasses.replace(self.request, torch_compile=bool(self.state.plan.request.get("torch_compile")),
                                      sharded=self._sharded, processes=self._processes)
        try:
            plan, result, shape = autotune_model(self._model, self.state.plan.environment, request,
                                                 self.autotune_tokens)
        except ValueError as err:
            self.decisions.record("autotune", f"autotune skipped: {err}", rule="autotune", step=step)
            return
        outcome = {"plan": plan.to_dict(), "reason": result.reason, "timings_ms": result.timings_ms, **shape}
        if trainer is not None and trainer.world_size > 1:
            outcome = trainer.strategy.broadcast(outcome, src=0)
        before = self.state.rung.label()
        self.state.plan = Plan.from_dict(outcome.pop("plan"))
        self.state.set_index(0)
        self._sync_precision_label()
        self.decisions.record("autotune", outcome.pop("reason"), rule="autotune", step=step, from_=before,
                              to=self.state.rung.label(), evidence=outcome)

    def _scaler_active(self) -> bool:
        return self._amp is not None and self.state is not None and self.state.dense.name == "fp16"

    def pre_backward(self, tensor: Tensor, module: Any) -> Tensor:
        if getattr(module, "_trainer", None) is None:  # Fabric calls this with a plain module (or None), no Trainer
            raise RuntimeError(
                "TEMoEPrecision is a lightning.Trainer plugin (its guard is a Trainer callback): under Fabric use"
                " lightning_te_moe.TEMoEFabricPrecision")
        if self._scaler_active():
            return self._amp.pre_backward(tensor, module)
        return Precision.pre_backward(self, tensor, module)

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        closure = functools.partial(self.memory.run, closure, model, self._trainer)  # out of memory: less, again
        if self._scaler_active():
            return self._amp.optimizer_step(optimizer, model, closure, **kwargs)
        return Precision.optimizer_step(self, optimizer, model=model, closure=closure, **kwargs)

    def clip_gradients(self, optimizer: Any, clip_val: Union[int, float] = 0.0, gradient_clip_algorithm: Any = None) -> None:
        target = self._amp if self._scaler_active() else super()
        kwargs = {} if gradient_clip_algorithm is None else {"gradient_clip_algorithm": gradient_clip_algorithm}
        target.clip_gradients(optimizer, clip_val=clip_val, **kwargs)

    # -- FSDPPrecision's hooks, as a plain Precision (see the class docstring) --------------------
    def clip_grad_by_norm(self, optimizer: Any, clip_val: Union[int, float]) -> None:
        """FSDP (v1) shards flat parameters, so the norm is the wrapped model's own ``clip_grad_norm_``; FSDP2's
        DTensor gradients and unsharded ones take torch's."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self._trainer.strategy.model if self._trainer is not None else None
        if isinstance(model, FullyShardedDataParallel):
            model.clip_grad_norm_(clip_val)
            return
        Precision.clip_grad_by_norm(self, optimizer, clip_val)

    @property
    def mixed_precision_config(self) -> Any:
        """FSDP's ``MixedPrecision`` for the plan: all-gather in the compute dtype, reduce gradients in FP32."""
        if self.state is None:
            raise RuntimeError("TEMoEPrecision.mixed_precision_config: the plan is made at setup (convert_module)")
        return fsdp_mixed_precision(self.state.plan)

    def tensor_init_context(self) -> AbstractContextManager:
        return Precision.tensor_init_context(self)

    def module_init_context(self) -> AbstractContextManager:
        return Precision.module_init_context(self)

    def convert_input(self, data: Any) -> Any:
        return Precision.convert_input(self, data)

    def convert_output(self, data: Any) -> Any:
        return Precision.convert_output(self, data)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.state is None:
            return {}
        return {
            "plan": self.state.plan.to_dict(),
            "rung": self.state.index,
            "decisions": self.decisions.state_dict(),
            "scaler": self._amp.state_dict() if self._amp is not None else {},
            "guard": self.guard.guard_state() if self.guard is not None else self._guard_state,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_step = int(checkpoint.get("global_step", 0))
        if type(self).__qualname__ not in checkpoint:  # Lightning's key: no history will replace the setup's
            self.decisions.release()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the checkpoint's plan and rung, unless this run's precision arguments or machine differ.

        Unchanged arguments on the same kind of machine continue where the checkpoint was (its rung, after any
        step-down, and its autotuned plan); new explicit arguments (recipe, allow, deny, ...) win: the run
        follows the plan made from them, from its first rung; on a different machine this machine's plan
        stands. Either way a ``resume`` decision says which and why. Autotune runs once per run: a resumed run
        never tunes again, so it cannot undo a step-down.
        """
        if not state_dict:
            return
        saved = Plan.from_dict(state_dict["plan"])
        saved_rung = saved.ladder[int(state_dict["rung"])].label()
        history = state_dict.get("decisions", [])
        step = self._resume_step or 0
        # cuda_graphs compares as planned (None is the rules' choice): a checkpoint whose run planned the same
        # graphs resumes its rung, whether it named them or left them to the plan.
        fresh = self.state.plan if self.state is not None else self.make_plan(
            _default_device(), sharded=self._sharded, processes=self._processes)
        changed = _changed_arguments({**saved.request, "cuda_graphs": saved.cuda_graphs},
                                     {**self.request.to_dict(), "cuda_graphs": fresh.cuda_graphs})
        if self.state is None:  # restored before setup (e.g. a strategy that restores early)
            self._set_up(fresh if changed else saved, _default_device())
        current_env = self.state.plan.environment
        same = _stack(saved.environment) == _stack(current_env)
        self._guard_state = state_dict.get("guard")
        if self.guard is not None and self._guard_state is not None:
            self.guard.load_guard_state(self._guard_state)
        self.decisions.load_state_dict(history)
        tuned = "" if not self._autotune_pending else (" autotune=True does not run again on resume (it runs once per"
                                                       " run), so it cannot undo a step-down.")
        self._autotune_pending = False
        if not same:
            self.decisions.record(
                "resume", f"checkpoint was planned for {saved.environment.summary()}; this machine is"
                f" {current_env.summary()}: keeping this machine's plan {self.state.plan.summary()}.{tuned}",
                step=step, from_=saved_rung, to=self.state.rung.label(), rule="checkpoint")
        elif changed:
            what = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            self.decisions.record(
                "resume", f"precision arguments changed since the checkpoint ({what}): following the new arguments,"
                f" plan {self.state.plan.summary()} from its first rung {self.state.rung.label()}; the checkpoint's"
                f" plan {saved.summary()} at rung {saved_rung} is not resumed.{tuned}",
                step=step, from_=saved_rung, to=self.state.rung.label(), rule="request",
                evidence={"changed": {k: list(v) for k, v in changed.items()}})
        else:
            self.state.plan = saved
            self.state.set_index(int(state_dict["rung"]))
            if self._amp is not None and state_dict.get("scaler"):
                self._amp.load_state_dict(state_dict["scaler"])
            self.decisions.record("resume", f"resumed on rung {self.state.index}: {self.state.rung.label()}"
                                  f" (precision arguments unchanged).{tuned}",
                                  step=step, to=self.state.rung.label(), rule="checkpoint")


def _stack(env: Environment) -> tuple[Any, ...]:
    """What makes two machines the same kind for a plan: the GPU generation, TE, and cuBLASLt (which decides the
    experts' GEMM path and so their measured recipe)."""
    return env.compute_capability, env.te_version, env.cublaslt_version


#: The arguments that make a plan; a resume with any of them changed follows the new ones.
_PLAN_ARGUMENTS = ("recipe", "allow", "deny", "auto_nvfp4", "prefer_stability", "strict", "params_dtype",
                   "cuda_graphs")


def _changed_arguments(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The plan arguments that differ between a checkpoint's request and this run's (allow/deny as sets)."""

    def norm(key: str, value: Any) -> Any:
        return sorted(value) if key in ("allow", "deny") else value

    return {k: (saved[k], now[k]) for k in _PLAN_ARGUMENTS
            if k in saved and norm(k, saved[k]) != norm(k, now[k])}


_OWNER = "TEMoEPrecision"
_PARAMS_DTYPES = ("float32", "bfloat16")


def _check_arguments(recipe: Any, params_dtype: Any, **flags: Any) -> None:
    """The constructor's checks that need no state: one clear error per bad argument, before anything is built."""
    if isinstance(recipe, str):
        check_choice(_OWNER, "recipe", recipe, ("auto", *RECIPE_NAMES), " (or a TE recipe object)")
    else:
        try:
            spec_from_te_recipe(recipe)  # fail now, with the supported types, not at setup
        except ValueError as err:
            raise ValueError(f"{_OWNER}(recipe={type(recipe).__name__}(...)): {err}") from None
    check_choice(_OWNER, "params_dtype", params_dtype, _PARAMS_DTYPES,
                 " (the dtype of the parameters and the optimizer state: every recipe computes from FP32 or BF16)")
    for name, value in flags.items():
        check_bool(_OWNER, name, value)


def _process_count() -> int:
    """Processes in the default group (1 without one): Fabric's ranks, where no Trainer says."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast(trainer: Any, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank: through the Trainer's strategy, else the default process group."""
    if trainer is not None:
        return trainer.strategy.broadcast(obj, src=0)
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

