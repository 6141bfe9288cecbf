"""`gradinv <stage>`: run one pipeline stage (or all) from params.yaml, without any orchestrator.
`gradinv import-gradient ...`: bring in a gradient captured elsewhere (see gradinv.client.importing).

User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradinv.client.importing import IMAGENET_MEAN, IMAGENET_STD, import_gradient
from gradinv.errors import UserError
from gradinv.pipeline.config import load_params
from gradinv.pipeline.stages import STAGES

IMPORT = "import-gradient"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradinv", description="GradInversion audit of a shared gradient.",
                                     epilog=f"To audit a gradient captured elsewhere: gradinv {IMPORT} --help")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project folder holding data/ (default: .)")
    parser.add_argument("command", choices=[*STAGES, "all"], help="a stage, or 'all' to run every stage in order")
    return parser


def _import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"gradinv {IMPORT}",
        description="Import a gradient, or a one-step weight update, captured outside gradinv: validate it against "
                    "the model and write data/victim and data/capture/gradient, so that `gradinv labels` and "
                    "`gradinv invert` run on it. The gradient must be that of the batch's mean cross-entropy with "
                    "BatchNorm in train mode. An update is new weights - old weights after one plain SGD step "
                    "(no momentum, no weight decay) of learning rate --lr, so gradient = -update / lr. "
                    "No ground truth comes with it, so `gradinv evaluate` cannot run.")
    parser.add_argument("--arch", required=True, help="torchvision model name, or package.module:callable")
    parser.add_argument("--weights", required=True, metavar="FILE", help="the model's weights (safetensors, or a state dict file)")
    parser.add_argument("--num-classes", required=True, type=int, metavar="N", help="classes of the model's final layer")
    parser.add_argument("--gradient", required=True, metavar="FILE",
                        help="safetensors or torch.save'd dict: parameter name (plain, 'grad.' or 'module.' prefix) "
                             "-> tensor; with --bn-leak exact also bn_mean.<layer> and bn_var.<layer> (biased)")
    parser.add_argument("--update", action="store_true", help="FILE holds a weight update, not a gradient (needs --lr)")
    parser.add_argument("--lr", type=float, help="the client's SGD learning rate, for --update")
    parser.add_argument("--batch-size", required=True, type=int, metavar="B", help="images in the client's batch")
    parser.add_argument("--input-size", required=True, type=int, metavar="PX", help="image side in pixels (square RGB inputs)")
    parser.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, metavar="M",
                        help="per-channel normalisation mean (default: ImageNet's)")
    parser.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, metavar="S",
                        help="per-channel normalisation std (default: ImageNet's)")
    parser.add_argument("--bn-leak", choices=["none", "exact"], default="none",
                        help="'exact' if FILE also carries the batch's BN statistics (default: none)")
    parser.add_argument("--root", default=".", metavar="DIR", help="project folder to write data/ into (default: .)")
    return parser


def run(command: str, params_path: str, root: str) -> None:
    params = load_params(params_path)
    names = list(STAGES) if command == "all" else [command]
    for name in names:
        stage = STAGES[name]
        print(f"# {name}")
        for path in stage.run(params[stage.section], Path(root), None, params["engine"]):
            print(path)


def run_import(args: argparse.Namespace) -> None:
    written = import_gradient(args.arch, args.weights, args.num_classes, args.gradient,
                              "update" if args.update else "gradient", args.batch_size, args.input_size,
                              args.mean, args.std, args.bn_leak, args.lr, args.root)
    print(f"# {IMPORT}")
    for path in written:
        print(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    importing = argv[:1] == [IMPORT]
    args = _import_parser().parse_args(argv[1:]) if importing else _parser().parse_args(argv)
    try:
        if importing:
            run_import(args)
        else:
            run(args.command, args.params, args.root)
    except UserError as err:
        print(f"gradinv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradinv: interrupted; rerun the same command to go on: an inversion resumes from its last "
              "checkpoint in data/.checkpoints", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
