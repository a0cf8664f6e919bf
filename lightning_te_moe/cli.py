"""``lightning-te-moe``: ``plan`` shows what would be chosen and why; ``fit``/``validate``/``test`` run the
main job through LightningCLI (``--config examples/configs/gpt_oss_tiny.yaml``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

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
                               strict=not args.no_strict, torch_compile=args.torch_compile)
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


def lightning_cli(argv: list[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    from .example import StdlibBytesDataModule, TinyMoELanguageModel

    LightningCLI(TinyMoELanguageModel, StdlibBytesDataModule, args=argv, save_config_kwargs={"overwrite": True})


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "plan":
        return plan_command(argv[1:])
    if argv[0] in LIGHTNING_COMMANDS:
        lightning_cli(argv)
        return 0
    print(f"lightning-te-moe: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
