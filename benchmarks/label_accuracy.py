"""Label-recovery accuracy against batch size, for every strategy.

    python -m benchmarks.label_accuracy                # full run: a GPU matches the surrogates (minutes)
    python -m benchmarks.label_accuracy --bn-batches 4 # on 2 CPU cores: about 20 minutes per victim
    python -m benchmarks.label_accuracy --quick        # smoke run, results in a temporary folder
    python -m benchmarks.label_accuracy --doc          # doc and plot from the results file

Settings: (a) the embedded victim (resnet18, 12 photo classes, 32 px) trained as params.yaml
says; (c) the same victim after 0, 1, 2 and 4 epochs; (b) an untrained torchvision ResNet-50
with 1000 classes at 224 px. Batches come from the embedded pool with distinct labels, or with
labels drawn with replacement (repeats). For ResNet-50, distinct batches get distinct random
labels among the 1000 classes, and batches with replacement keep the photos' own 12 labels, so
that labels repeat heavily. Accuracy = multiset overlap of recovered and true labels / batch size.

`counts` runs as the stage runs it when BN statistics leak (the default capture): p̄ from
surrogate batches matched to the leaked statistics (labels.posterior_steps Adam steps,
labels.posterior_restarts surrogates per batch), on the embedded victims; the surrogates of all
batches of a point are matched together, on the GPU when there is one. `counts, noise p̄` is the
same rule with p̄ from noise, as without a BN leak. Two diagnostics per point, not strategies:
`counts, true p̄` is `counts` given the batch's own mean softmax (what the attacker lacks), and
`confident` is the share of samples the client's model puts at ≥ 0.99 on their true class:
such a sample's p − y is ~0, so it adds nearly nothing to any layer's gradient and its label is
nearly invisible.

Writes benchmarks/results/label_accuracy.parquet after every point (with the machine's
description and the command), then docs/label_accuracy.md and docs/label_accuracy.png. On a
machine without the photo packages or matplotlib: `--prepare-only DIR` here, `--prepared DIR`
there, `--doc` back here.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from benchmarks.common import DOCS, REPO, RESULTS, argument_parser, command
from gradinv.attack.labels import count_labels, dummy_posterior, idlg_label, match_bn_statistics, yin_labels
from gradinv.client.artifacts import GradientArtifact, gradient_meta
from gradinv.client.data import load_set, normalize, prepare
from gradinv.client.models import final_linear
from gradinv.client.step import parameter_gradients, recorded_bn_statistics, train_mode_copy
from gradinv.client.victim import load_victim, train
from gradinv.errors import UserError
from gradinv.evaluation.metrics import label_accuracy
from gradinv.io import write_table
from gradinv.pipeline.config import load_params

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48)
RESNET50 = "resnet50 224px, untrained"


def head_artifact(model, images, labels, arch: str, mean, std) -> GradientArtifact:
    """The client's gradient restricted to the final Linear layer (all that the gradient-only
    strategies read), with the batch's BN statistics (leaked, as in the default capture): same
    train-mode forward, backward through the head only."""
    client = train_mode_copy(model)
    head_name, head = final_linear(client)
    for name, p in client.named_parameters():
        p.requires_grad_(name.startswith(head_name + "."))
    with recorded_bn_statistics(client) as stats:
        grads = parameter_gradients(client, images, labels)
    meta = gradient_meta(arch, head.out_features, list(images.shape[1:]), mean, std, len(labels), "exact")
    return GradientArtifact({n: g.detach() for n, g in grads.items()}, meta,
                            {n: m.detach() for n, (m, _) in stats.items()}, {n: v.detach() for n, (_, v) in stats.items()})


def draw_labels(mode: str, batch: int, pool_labels: torch.Tensor, classes: int, relabel: bool, generator):
    """Pool indices and the labels the client trains them with."""
    if mode == "distinct" and not relabel:
        chosen = torch.randperm(int(pool_labels.max()) + 1, generator=generator)[:batch]
        index = torch.stack([(pool_labels == c).nonzero().flatten()[
            torch.randint(int((pool_labels == c).sum()), (), generator=generator)] for c in chosen])
        return index, pool_labels[index]
    index = torch.randint(len(pool_labels), (batch,), generator=generator)
    if mode == "distinct":  # relabel: distinct random classes of the large head
        return index, torch.randperm(classes, generator=generator)[:batch]
    return index, pool_labels[index]


def batch_posteriors(model, images: torch.Tensor) -> torch.Tensor:
    """The client's softmax for each sample, in its train-mode forward (batch statistics)."""
    with torch.no_grad():
        return torch.softmax(train_mode_copy(model)(images), 1).double()


def bn_matched_counts(model, artifacts: list[GradientArtifact], steps: int, restarts: int, chunk: int,
                      device: torch.device) -> list[list[int]]:
    """`counts` as the stage runs it when BN statistics leak, for many batches at once: their
    surrogate batches are matched together (`match_bn_statistics`, `chunk` batches per call, each
    with `restarts` surrogates, as `bn_matched_posterior` draws them)."""
    matcher = copy.deepcopy(model).to(device)
    recovered = []
    for first in range(0, len(artifacts), chunk):
        group = artifacts[first:first + chunk]
        stack = lambda name, field: torch.stack(  # noqa: E731
            [getattr(a, field)[name] for a in group]).repeat_interleave(restarts, 0)
        names = list(group[0].bn_mean)
        _, logits = match_bn_statistics(matcher, {n: stack(n, "bn_mean") for n in names},
                                        {n: stack(n, "bn_var") for n in names}, group[0].batch_size,
                                        group[0].meta["input_shape"], steps, show_progress=False)
        posteriors = torch.softmax(logits.double(), -1).unflatten(0, (len(group), restarts)).mean((1, 2)).cpu()
        recovered += [count_labels(model, artifact, posterior)[0] for artifact, posterior in zip(group, posteriors)]
    return recovered


def run_setting(rows: list, setting: str, epochs: int | None, model, arch: str, pool, mean, std,
                batches: int, relabel: bool, seed: int, bn: dict | None = None, on_point=lambda: None) -> None:
    """Every strategy on `batches` random batches per point; with `bn` (steps, restarts, batches,
    chunk, device), `counts` with the BN-matched posterior (what the stage runs when BN
    statistics leak) on the first `bn["batches"]` of them."""
    classes = final_linear(model)[1].out_features
    images_all = normalize(pool.images, mean, std)
    for batch in BATCH_SIZES:
        posterior = None
        for mode in ("distinct", "replacement"):
            if mode == "distinct" and batch > (classes if relabel else int(pool.labels.max()) + 1):
                continue
            generator = torch.Generator().manual_seed(seed * 7919 + batch)
            scores: dict[str, list[float]] = {}
            seconds: dict[str, float] = {}
            drawn = []
            for _ in range(batches):
                index, labels = draw_labels(mode, batch, pool.labels, classes, relabel, generator)
                try:
                    artifact = head_artifact(model, images_all[index], labels, arch, mean, std)
                except ValueError:
                    break  # train-mode BN cannot run one image through a 1×1 feature map
                drawn.append((artifact, labels))
                if posterior is None:
                    posterior = dummy_posterior(model, artifact)
                truth = batch_posteriors(model, images_all[index])
                strategies = {"counts, noise p̄": lambda: count_labels(model, artifact, posterior),
                              "counts, true p̄": lambda: count_labels(model, artifact, truth.mean(0))}
                scores.setdefault("confident", []).append(
                    (truth[torch.arange(len(labels)), labels] >= 0.99).double().mean().item())
                if batch <= classes:
                    strategies["yin"] = lambda: yin_labels(model, artifact)
                if batch == 1:
                    strategies["idlg"] = lambda: idlg_label(model, artifact)
                for name, recover in strategies.items():
                    start = time.perf_counter()
                    scores.setdefault(name, []).append(label_accuracy(recover()[0], labels.tolist()))
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            if bn and bn["batches"] and batch > 1 and drawn:
                start = time.perf_counter()
                chosen = drawn[:bn["batches"]]
                found = bn_matched_counts(model, [a for a, _ in chosen], bn["steps"], bn["restarts"], bn["chunk"], bn["device"])
                scores["counts"] = [label_accuracy(f, labels.tolist()) for f, (_, labels) in zip(found, chosen)]
                seconds["counts"] = time.perf_counter() - start
            for name, values in scores.items():
                rows.append({"setting": setting, "arch": arch, "classes": classes, "resolution": pool.images.shape[-1],
                             "training_epochs": epochs, "batch_size": batch, "labels": mode, "strategy": name,
                             "batches": len(values), "accuracy": sum(values) / len(values),
                             "exact_batches": sum(v == 1.0 for v in values) / len(values),
                             "seconds": seconds.get(name, 0.0)})
            if scores:
                summary = ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in scores.items())
                print(f"{setting:>24} bs {batch:>2} {mode:>11}: {summary}", flush=True)
                on_point()


def machine(device: torch.device) -> str:
    gpu = f", {torch.cuda.get_device_name(device)} (surrogate batches)" if device.type == "cuda" else ""
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads{gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_doc_from(results: Path) -> int:
    """docs/label_accuracy.md and .png from a results file (the machine and command it records)."""
    import pyarrow.parquet as pq

    write_doc(pq.read_table(results).to_pylist(), DOCS / "label_accuracy.png", DOCS / "label_accuracy.md")
    print(f"wrote {DOCS / 'label_accuracy.md'}")
    return 0


def write_doc(rows: list, out_png: Path, out_md: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = lambda r: (r["arch"] == "resnet50", r["training_epochs"] or 0)  # noqa: E731
    settings = list(dict.fromkeys(r["setting"] for r in sorted(rows, key=order)))
    figure, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3.2), sharey=True, squeeze=False)
    for axis, setting in zip(axes[0], settings):
        for strategy in ("yin", "counts, noise p̄", "counts"):
            for mode, style in (("distinct", "-o"), ("replacement", "--s")):
                mine = [r for r in rows if r["setting"] == setting and r["strategy"] == strategy and r["labels"] == mode]
                if mine:
                    axis.plot([r["batch_size"] for r in mine], [r["accuracy"] for r in mine], style,
                              label=f"{strategy}, {mode}", markersize=3)
        axis.set_xscale("log", base=2), axis.set_title(setting, fontsize=8), axis.set_xlabel("batch size")
        axis.set_ylim(0, 1.02), axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("label accuracy"), axes[0][0].legend(fontsize=6)
    figure.savefig(out_png, dpi=110, bbox_inches="tight")

    runs: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        names = runs.setdefault((r["command"], r["machine"]), [])
        names += [r["setting"]] if r["setting"] not in names else []
    lines = ["# Label recovery accuracy", ""]
    for (command, machine_description), names in runs.items():
        lines += [f"`{command}`: {'; '.join(names)}  ", f"Machine: {machine_description}", ""]
    lines += ["Accuracy = multiset overlap of recovered and true labels / batch size, averaged over "
              "random batches (their number in brackets). The Parquet file also holds the share of "
              "batches recovered exactly. Results: `benchmarks/results/label_accuracy.parquet`.", "",
              "| setting | labels | strategy | " + " | ".join(f"bs {b}" for b in BATCH_SIZES) + " |",
              "|---|---|---|" + "---|" * len(BATCH_SIZES)]
    for setting in settings:
        for mode in ("distinct", "replacement"):
            for strategy in ("yin", "idlg", "counts", "counts, noise p̄", "counts, true p̄", "confident"):
                cells = {r["batch_size"]: r for r in rows if (r["setting"], r["labels"], r["strategy"]) == (setting, mode, strategy)}
                if cells:
                    values = " | ".join(f"{cells[b]['accuracy']:.1%} ({cells[b]['batches']})" if b in cells else "–"
                                        for b in BATCH_SIZES)
                    lines.append(f"| {setting} | {mode} | {strategy} | {values} |")
    lines += ["", "Cells: accuracy (number of batches). –: not applicable (yin needs distinct labels and "
              "at most as many images as classes; idlg needs a batch of one; at 32 px a batch of one "
              "cannot pass train-mode BatchNorm, whose last feature map is 1×1). Diagnostic rows: "
              "`counts, true p̄` is `counts` handed the batch's own mean softmax, which no attacker has "
              "(it shows that p̄ is all that `counts` misses); `confident` is the share of samples at ≥ 0.99 "
              "on their true class, whose labels the gradient barely carries.", "",
              "`counts` is the stage's rule with BN statistics leaked (the default capture): p̄ is the mean "
              "softmax of surrogate batches (labels.posterior_restarts of them, from different noise) "
              "moved by labels.posterior_steps Adam steps until each BatchNorm channel's mean and variance "
              "match the leaked ones in units of the channel's own spread (`standardized_bn_distance`). "
              "The inversion's absolute BN distance, used here before, leaves the deep layers, which carry "
              "the classes, loosest; the table's earlier version (commit 3ea9356) had `counts` at 94.1 / "
              "92.7 % at bs 32 / 48 with it. Cells with fewer batches than their row's others come from "
              "runs on a CPU, where a surrogate costs about a second per image for 1000 steps.", "",
              f"![label accuracy]({out_png.name})", ""]
    out_md.write_text("\n".join(lines))


def prepared_sets(params, prepared: Path | None, tmp: Path) -> tuple[Path, Path]:
    """The embedded 32 px sets and the 224 px ones for ResNet-50: from `prepared` (sets/ and
    sets224/ made by a previous run, for machines without the packages the photos come from),
    else made here."""
    sets, sets224 = (prepared / "sets", prepared / "sets224") if prepared else (tmp / "sets", tmp / "sets224")
    if not prepared:
        prepare(params["data"], sets)
        prepare(dataclasses.replace(params["data"], resolution=224, train_per_class=1, pool_per_class=8), sets224)
    for folder in (sets, sets224):
        if not (folder / "sets.json").is_file():
            raise UserError(f"--prepared needs prepared image sets in {folder}, and there are none.")
    return sets, sets224


def earlier_rows(results: Path) -> list[dict]:
    """The rows of an earlier results file, if any."""
    if not results.is_file():
        return []
    import pyarrow.parquet as pq

    return [{"command": "python benchmarks/label_accuracy.py", **r}  # files from before the column
            for r in pq.read_table(results).to_pylist()]


def write_results(rows: list, earlier: list, out: Path, device: torch.device, command: str) -> Path:
    """This run's rows, stamped with the machine and the command, and the earlier rows of every
    setting this run has not measured (yet): a partial rerun replaces whole settings only."""
    mine = [{**r, "machine": machine(device), "command": command} for r in rows]
    measured = {r["setting"] for r in rows}
    kept = [r for r in earlier if r["setting"] not in measured]
    columns = {key: [r[key] for r in kept + mine] for key in mine[0]}
    return write_table(out / "label_accuracy.parquet", columns)


def main() -> int:
    parser = argument_parser("label_accuracy", __doc__)
    parser.add_argument("--batches", type=int, default=50, help="batches per point, embedded victim")
    parser.add_argument("--resnet50-batches", type=int, default=5, help="batches per point, ResNet-50")
    parser.add_argument("--stages", default="0,1,2,4", help="training epochs of the extra victim snapshots")
    parser.add_argument("--bn-batches", type=int, default=50,
                        help="batches per point for `counts` with the BN-matched posterior (embedded victims)")
    parser.add_argument("--bn-steps", type=int, default=None, help="Adam steps per surrogate (default: params.yaml)")
    parser.add_argument("--bn-chunk", type=int, default=50, help="batches whose surrogates are matched in one call")
    parser.add_argument("--device", default=None, help="where surrogate batches are matched (default: cuda if present)")
    parser.add_argument("--prepared", type=Path, default=None,
                        help="folder with sets/ and sets224/ from `--prepare-only` (no photo packages needed)")
    parser.add_argument("--prepare-only", type=Path, default=None, help="write the image sets to this folder and stop")
    parser.add_argument("--doc", action="store_true", help="only rewrite the doc and plot from the Parquet results")
    parser.add_argument("--settings", choices=("all", "embedded", "resnet50"), default="all",
                        help="rerun only these settings; the results file keeps the other settings' rows")
    parser.add_argument("--no-pipeline", action="store_true", help="only the snapshots of --stages")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few batches, no ResNet-50")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results; --quick: a temporary folder)")
    args = parser.parse_args()
    command_line = command("label_accuracy", sys.argv[1:])
    args.out = args.out or (Path(tempfile.gettempdir()) / "label_accuracy-quick" if args.quick else RESULTS)
    if args.doc:
        return write_doc_from(args.out / "label_accuracy.parquet")
    if args.quick:
        args.batches, args.resnet50_batches, args.stages, args.bn_batches, args.bn_steps = 3, 0, "0", 2, 30
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = load_params(REPO / "params.yaml")
    labels_config = params["labels"]
    bn = {"steps": labels_config.posterior_steps if args.bn_steps is None else args.bn_steps,
          "restarts": labels_config.posterior_restarts, "batches": args.bn_batches, "chunk": args.bn_chunk,
          "device": device}
    rows: list[dict] = []
    pipeline_epochs = params["victim"].epochs
    snapshots = sorted({int(e) for e in args.stages.split(",") if e} - {pipeline_epochs}, reverse=True)
    victims = [] if args.settings == "resnet50" else ([] if args.no_pipeline else [pipeline_epochs]) + snapshots
    names = {e: f"resnet18 32px, {e} epochs" + (" (pipeline)" if e == pipeline_epochs else "") for e in victims}
    resnet50 = bool(args.resnet50_batches) and args.settings != "embedded"
    earlier = earlier_rows(args.out / "label_accuracy.parquet")
    args.out.mkdir(parents=True, exist_ok=True)
    save = lambda: write_results(rows, earlier, args.out, device, command_line)  # noqa: E731  after every point
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.prepare_only:
            prepared_sets(params, None, args.prepare_only)
            print(f"wrote {args.prepare_only}")
            return 0
        sets, sets224 = prepared_sets(params, args.prepared, tmp)
        pool = load_set(sets, "pool")
        mean, std = params["data"].mean, params["data"].std
        for epochs in victims:  # the pipeline's victim first: a cut-short run has it
            train(dataclasses.replace(params["victim"], epochs=epochs, device="cpu"), sets, tmp / f"victim{epochs}")
            model, _ = load_victim(tmp / f"victim{epochs}")
            run_setting(rows, names[epochs], epochs, model, "resnet18", pool, mean, std, args.batches, False, epochs, bn, save)
        if resnet50:
            torch.manual_seed(0)
            model = torchvision.models.resnet50(weights=None, num_classes=1000).eval()
            run_setting(rows, RESNET50, None, model, "resnet50", load_set(sets224, "pool"),
                        mean, std, args.resnet50_batches, True, 50, on_point=save)
    written = save()
    print(f"wrote {written}")
    if not args.quick:
        try:
            write_doc_from(written)
        except ImportError:  # a GPU machine without matplotlib: rerun with --doc where it is installed
            print("matplotlib is missing: the doc was not rewritten (run again with --doc)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
