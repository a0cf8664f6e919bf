"""``lightning-te-moe``: ``plan`` shows what would be chosen and why; ``fit``/``validate``/``test`` run the
main job through LightningCLI (``--config examples/configs/gpt_oss_tiny.yaml``)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import shlex
import sys
import textwrap
import typing
from typing import Any, NoReturn, Optional

from .policy import PlanError, PrecisionRequest, make_plan
from .policy.environment import Environment, parse_version, probe_environment, te_installed_version
from .policy.recipes import RECIPE_NAMES

USAGE = """usage: lightning-te-moe {plan,fit,validate,test,predict} ...

  plan       what recipe would be chosen on this machine (or an assumed one), and why
  fit        train the example model with LightningCLI, e.g. --config examples/configs/gpt_oss_tiny.yaml
  validate / test / predict   the other LightningCLI subcommands
Run 'lightning-te-moe plan --help' or 'lightning-te-moe fit --help' for their options."""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _version_arg(text: str) -> str:
    try:
        parse_version(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def _cc_arg(text: str) -> str:
    try:
        Environment.assume(cc=text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


#: ``--cuda-graphs`` on the command line -> the plugin's ``cuda_graphs`` (``auto``: None, the plan decides).
CUDA_GRAPHS_ARG = {"auto": None, "on": True, "off": False}


def plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-te-moe plan",
                                     description="Show the precision plan for this machine, or for an assumed one.")
    parser.add_argument("--assume-cc", type=_cc_arg, metavar="X.Y",
                        help="compute capability of an assumed GPU (e.g. 9.0, 12.1) or 'cpu'")
    parser.add_argument("--assume-te", type=_version_arg, metavar="VERSION", help="Transformer Engine version")
    parser.add_argument("--assume-cudnn", type=_version_arg, metavar="VERSION", help="cuDNN version")
    parser.add_argument("--assume-cuda", type=_version_arg, metavar="VERSION", help="CUDA version torch is built with")
    parser.add_argument("--assume-cublaslt", type=_version_arg, metavar="VERSION", help="cuBLASLt version")
    parser.add_argument("--recipe", default="auto", choices=("auto",) + RECIPE_NAMES)
    parser.add_argument("--allow", nargs="+", default=(), choices=RECIPE_NAMES, metavar="RECIPE")
    parser.add_argument("--deny", nargs="+", default=(), choices=RECIPE_NAMES, metavar="RECIPE")
    parser.add_argument("--auto-nvfp4", action="store_true", help="let auto choose NVFP4")
    parser.add_argument("--prefer-stability", action="store_true")
    parser.add_argument("--no-strict", action="store_true", help="step down instead of failing on a forbidden recipe")
    parser.add_argument("--torch-compile", action="store_true", help="plan for a model run under torch.compile")
    parser.add_argument("--cuda-graphs", choices=tuple(CUDA_GRAPHS_ARG), default="auto",
                        help="the plugin's cuda_graphs: auto (None: the plan decides), on (True) or off (False)")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="processes in the run (DDP / FSDP ranks); rules differ for several")
    parser.add_argument("--sharded", action="store_true",
                        help="plan for parameters sharded over several ranks (Lightning's FSDP / FSDP2 strategies)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def environment_from_args(args: argparse.Namespace) -> Environment:
    """The real machine, with any ``--assume-*`` flag replacing what was probed."""
    if args.assume_cc is not None:
        return Environment.assume(cc=args.assume_cc, te=args.assume_te or te_installed_version(),
                                  cudnn=args.assume_cudnn, torch_cuda=args.assume_cuda, cublaslt=args.assume_cublaslt)
    env = probe_environment()
    overrides = {k: v for k, v in (("te_version", args.assume_te), ("cudnn_version", args.assume_cudnn),
                                   ("torch_cuda", args.assume_cuda), ("cublaslt_version", args.assume_cublaslt))
                 if v is not None}
    if overrides:  # TE's own checks describe the real install, not the assumed one
        env = dataclasses.replace(env, **overrides, te_checks={}, assumed=True)
    return env


def plan_command(argv: list[str]) -> int:
    args = plan_parser().parse_args(argv)
    request = PrecisionRequest(recipe=args.recipe, allow=tuple(args.allow), deny=tuple(args.deny),
                               auto_nvfp4=args.auto_nvfp4, prefer_stability=args.prefer_stability,
                               strict=not args.no_strict, torch_compile=args.torch_compile,
                               cuda_graphs=CUDA_GRAPHS_ARG[args.cuda_graphs],
                               sharded=args.sharded, processes=args.processes)
    try:
        plan = make_plan(environment_from_args(args), request)
    except PlanError as err:
        print(f"lightning-te-moe plan: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(plan.to_json())
    else:
        from rich.console import Console

        Console().print(plan.render())
    return 0


def lightning_cli(argv: Optional[list[str]]) -> None:
    """Run a LightningCLI subcommand; ``argv=None`` reads ``sys.argv`` (the console script)."""
    from .example import StdlibBytesDataModule, TinyMoELanguageModel

    _main_job_cli_class()(TinyMoELanguageModel, StdlibBytesDataModule, argv=argv)


def _config_error(prog: str, text: str) -> NoReturn:
    """A configuration error as one line (plus where to look), exit status 2 like any argparse error."""
    print(f"{prog}: error: {text}", file=sys.stderr)
    print(f"({prog} --help lists the options; JSONARGPARSE_DEBUG=1 shows the full parser message)", file=sys.stderr)
    raise SystemExit(2)


def _main_job_cli_class() -> type:
    """The LightningCLI subclass (built on first use: importing Lightning's CLI costs a second at ``plan``)."""
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from .cli_errors import condense
    from .interrupt import InterruptCheckpoint
    from .progress import TextProgressBar

    class Parser(LightningArgumentParser):
        """Prints a bad option or value as one line naming the field and what is allowed, not usage + a tree."""

        def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
            if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
                super().error(message, ex)  # a nested parser trying one type of a union: it raises, no exit
            parser = getattr(ex, "subcommand_parser", None) or self
            _config_error(parser.prog.replace(" [options]", ""), condense(message))

    class MainJobCLI(LightningCLI):
        """LightningCLI with one-line configuration errors, plain progress lines when stdout is not a terminal,
        and, on Ctrl-C, where the checkpoint is and the command that resumes from it (exit status 130)."""

        def __init__(self, *classes: Any, argv: Optional[list[str]]) -> None:
            self.argv = list(sys.argv[1:] if argv is None else argv)
            # subcommand parsers take the main parser's formatter, which prints the epilog line by line
            help_kwargs = {c: {"epilog": plugin_options_help(), "description": _subcommand_description(c)}
                           for c in LIGHTNING_COMMANDS}
            super().__init__(*classes, args=argv, parser_class=Parser, save_config_kwargs={"overwrite": True},
                             parser_kwargs={"prog": "lightning-te-moe", "formatter_class": _help_formatter(),
                                            **help_kwargs})

        @property
        def prog(self) -> str:
            return f"lightning-te-moe {self.subcommand}"

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as err:  # a constructor refused a configured value
                if os.environ.get("JSONARGPARSE_DEBUG"):
                    raise
                _config_error(self.prog, condense(str(err)))

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer = self.config_init[self.subcommand]["trainer"]
            callbacks = list(trainer.get("callbacks") or [])
            if (not sys.stdout.isatty() and trainer.get("enable_progress_bar") is not False
                    and not any(isinstance(c, ProgressBar) for c in callbacks)):
                kwargs["callbacks"] = [*callbacks, TextProgressBar()]  # rich's bar prints nothing off a terminal
            for callback in callbacks:
                if isinstance(callback, InterruptCheckpoint):
                    callback.resume_hint = lambda path: resume_command(self.argv, path)
            return super().instantiate_trainer(**kwargs)

        def fit(self, **kwargs: Any) -> None:
            self._run("fit", **kwargs)

        def validate(self, **kwargs: Any) -> None:
            self._run("validate", **kwargs)

        def test(self, **kwargs: Any) -> None:
            self._run("test", **kwargs)

        def predict(self, **kwargs: Any) -> None:
            self._run("predict", **kwargs)

        def _run(self, subcommand: str, **kwargs: Any) -> None:
            try:
                getattr(self.trainer, subcommand)(**kwargs)
            except PlanError as err:  # the requested recipe cannot run here: a configuration error
                _config_error(self.prog, str(err))
            except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after the callbacks' on_exception
                if not self.trainer.interrupted:
                    raise
                if not any(getattr(c, "saved_path", None) for c in self.trainer.callbacks):
                    print(self._nothing_saved(), file=sys.stderr, flush=True)
                raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports Ctrl-C

        def _nothing_saved(self) -> str:
            head = f"[lightning-te-moe] interrupted at step {self.trainer.global_step}"
            last = [c.last_model_path for c in self.trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")]
            if last and self.subcommand == "fit":
                resume = resume_command(self.argv, last[0])
                return f"{head}; the newest checkpoint is {last[0]}\n  resume with: {resume}"
            return f"{head}; nothing was saved (examples/configs/gpt_oss_tiny.yaml shows the checkpoint callbacks)"

    return MainJobCLI


def resume_command(argv: list[str], ckpt_path: str) -> str:
    """The command line that continues the run of ``argv`` from ``ckpt_path`` (any earlier --ckpt_path replaced)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["lightning-te-moe", *kept, "--ckpt_path", ckpt_path])


def _subcommand_description(subcommand: str) -> str:
    from lightning.pytorch import Trainer

    summary = (inspect.getdoc(getattr(Trainer, subcommand)) or "").strip().splitlines()[0]
    return f"{summary} The precision plugin's options are listed at the end."


def _help_formatter() -> type:
    """jsonargparse's help formatter, printing descriptions and the epilog (the plugin's options) as written."""
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


def plugin_options_help(width: int = 100) -> str:
    """The precision plugin's options for ``fit --help`` (LightningCLI's own help only says ``trainer.plugins``
    takes a class): name, allowed values, default, and the docstring's description."""
    from docstring_parser import parse

    from .plugin import TEMoEPrecision, TERecipe

    docs = {p.arg_name: " ".join(p.description.split()) for p in parse(TEMoEPrecision.__doc__ or "").params}
    hints = typing.get_type_hints(TEMoEPrecision.__init__)
    lines = ["lightning-te-moe precision plugin options (under trainer.plugins, as in the example config:",
             "  plugins: [{class_path: lightning_te_moe.TEMoEPrecision, init_args: {recipe: auto, ...}}]):"]
    for name, param in inspect.signature(TEMoEPrecision).parameters.items():
        lines += textwrap.wrap(f"{name}: {_values(hints[name], TERecipe)} (default: {param.default})", width,
                               initial_indent="  ", subsequent_indent=" " * 6)
        lines += textwrap.wrap(docs.get(name, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def _values(hint: Any, python_only: type) -> str:
    """Allowed values of a plugin argument, briefly (leaving out ``python_only``, a type YAML cannot give)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union:
        return " | ".join(_values(a, python_only) for a in args if a not in (type(None), python_only))
    if origin is list:
        return f"list of [{_values(args[0], python_only)}]"
    if dataclasses.is_dataclass(hint):
        return f"{hint.__name__} fields: " + ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(hint))
    return "true | false" if hint is bool else hint.__name__


def main(argv: Optional[list[str]] = None) -> int:
    from_caller = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "plan":
        return plan_command(argv[1:])
    if argv[0] in LIGHTNING_COMMANDS:
        lightning_cli(argv if from_caller else None)  # None: LightningCLI reads sys.argv itself (no warning)
        return 0
    print(f"lightning-te-moe: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
