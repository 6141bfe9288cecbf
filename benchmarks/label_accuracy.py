"""Label-recovery accuracy against batch size, for every strategy.

    .venv/bin/python benchmarks/label_accuracy.py            # full run (~37 min on 2 CPU cores)
    .venv/bin/python benchmarks/label_accuracy.py --quick    # smoke run

Settings: (a) the embedded victim (resnet18, 12 photo classes, 32 px) trained as params.yaml
says; (c) the same victim after 0, 1, 2 and 4 epochs; (b) an untrained torchvision ResNet-50
with 1000 classes at 224 px. Batches come from the embedded pool with distinct labels, or with
labels drawn with replacement (repeats). For ResNet-50, distinct batches get distinct random
labels among the 1000 classes, and batches with replacement keep the photos' own 12 labels, so
that labels repeat heavily. Accuracy = multiset overlap of recovered and true labels / batch size.

`counts` runs as the stage runs it when BN statistics leak (the default capture): p̄ from a
surrogate batch matched to the leaked statistics (1000 Adam steps per batch, so on the pipeline
victim only, and on fewer batches); `counts, noise p̄` is the same rule with p̄ from noise, as
without a BN leak. Two diagnostics per point, not strategies: `counts, true p̄` is `counts` given the batch's own
mean softmax instead of the dummy estimate (what the attacker lacks), and `confident` is the
share of samples the client's model puts at ≥ 0.99 on their true class: such a sample's
p − y is ~0, so it adds nearly nothing to any layer's gradient and its label is nearly invisible.

Writes benchmarks/results/label_accuracy.parquet, docs/label_accuracy.md and
docs/label_accuracy.png, with the machine's description.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gradinv.artifacts import GradientArtifact, gradient_meta  # noqa: E402
from gradinv.client import parameter_gradients, recorded_bn_statistics, train_mode_copy  # noqa: E402
from gradinv.config import load_params  # noqa: E402
from gradinv.data import load_set, normalize, prepare  # noqa: E402
from gradinv.errors import UserError  # noqa: E402
from gradinv.io import write_table  # noqa: E402
from gradinv.labels import bn_matched_posterior, count_labels, dummy_posterior, idlg_label, yin_labels  # noqa: E402
from gradinv.metrics import label_accuracy  # noqa: E402
from gradinv.models import final_linear  # noqa: E402
from gradinv.victim import load_victim, train  # noqa: E402

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48)


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


def run_setting(rows: list, setting: str, epochs: int | None, model, arch: str, pool, mean, std,
                batches: int, relabel: bool, seed: int, bn_batches: int = 0, bn_steps: int = 1000) -> None:
    """Every strategy on `batches` random batches per point; `counts` with the BN-matched
    posterior (what the stage runs when BN statistics leak) on the first `bn_batches` of them."""
    classes = final_linear(model)[1].out_features
    images_all = normalize(pool.images, mean, std)
    for batch in BATCH_SIZES:
        posterior = None
        for mode in ("distinct", "replacement"):
            if mode == "distinct" and batch > (classes if relabel else int(pool.labels.max()) + 1):
                continue
            generator = torch.Generator().manual_seed(seed * 7919 + batch)
            scores: dict[str, list[float]] = {}
            start = time.perf_counter()
            for _ in range(batches):
                index, labels = draw_labels(mode, batch, pool.labels, classes, relabel, generator)
                try:
                    artifact = head_artifact(model, images_all[index], labels, arch, mean, std)
                except ValueError:
                    break  # train-mode BN cannot run one image through a 1×1 feature map
                if posterior is None:
                    posterior = dummy_posterior(model, artifact)
                truth = batch_posteriors(model, images_all[index])
                strategies = {"counts, noise p̄": lambda: count_labels(model, artifact, posterior),
                              "counts, true p̄": lambda: count_labels(model, artifact, truth.mean(0))}
                if len(scores.get("confident", [])) < bn_batches and batch > 1:
                    strategies["counts"] = lambda: count_labels(model, artifact, bn_matched_posterior(model, artifact, bn_steps))
                scores.setdefault("confident", []).append(
                    (truth[torch.arange(len(labels)), labels] >= 0.99).double().mean().item())
                if batch <= classes:
                    strategies["yin"] = lambda: yin_labels(model, artifact)
                if batch == 1:
                    strategies["idlg"] = lambda: idlg_label(model, artifact)
                for name, recover in strategies.items():
                    scores.setdefault(name, []).append(label_accuracy(recover()[0], labels.tolist()))
            for name, values in scores.items():
                rows.append({"setting": setting, "arch": arch, "classes": classes, "resolution": pool.images.shape[-1],
                             "training_epochs": epochs, "batch_size": batch, "labels": mode, "strategy": name,
                             "batches": len(values), "accuracy": sum(values) / len(values),
                             "exact_batches": sum(v == 1.0 for v in values) / len(values),
                             "seconds": time.perf_counter() - start})
            if scores:
                summary = ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in scores.items())
                print(f"{setting:>24} bs {batch:>2} {mode:>11}: {summary}", flush=True)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_doc(rows: list, out_png: Path, out_md: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
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

    lines = ["# Label recovery accuracy", "", f"Command: `{command}`  ", f"Machine: {machine()}", "",
             "Accuracy = multiset overlap of recovered and true labels / batch size, averaged over "
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
              f"![label accuracy]({out_png.name})", ""]
    out_md.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=50, help="batches per point, embedded victim")
    parser.add_argument("--resnet50-batches", type=int, default=5, help="batches per point, ResNet-50")
    parser.add_argument("--stages", default="0,1,2,4", help="training epochs of the extra victim snapshots")
    parser.add_argument("--bn-batches", type=int, default=8,
                        help="batches per point for `counts` with the BN-matched posterior (pipeline victim only: "
                             "1000 Adam steps per batch)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few batches, no ResNet-50")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.quick:
        args.batches, args.resnet50_batches, args.stages, args.bn_batches = 3, 0, "0", 1
    command = " ".join(["python benchmarks/label_accuracy.py", *sys.argv[1:]])
    params = load_params(REPO / "params.yaml")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(params["data"], tmp / "sets")
        pool = load_set(tmp / "sets", "pool")
        mean, std = params["data"].mean, params["data"].std
        stages = [int(e) for e in args.stages.split(",") if e] + [params["victim"].epochs]
        for epochs in sorted(set(stages)):
            train(dataclasses.replace(params["victim"], epochs=epochs, device="cpu"), tmp / "sets", tmp / f"victim{epochs}")
            model, _ = load_victim(tmp / f"victim{epochs}")
            name = f"resnet18 32px, {epochs} epochs" + (" (pipeline)" if epochs == params["victim"].epochs else "")
            bn_batches = args.bn_batches if epochs == params["victim"].epochs else 0
            run_setting(rows, name, epochs, model, "resnet18", pool, mean, std, args.batches, False, epochs,
                        bn_batches, params["labels"].posterior_steps)
        if args.resnet50_batches:
            prepare(dataclasses.replace(params["data"], resolution=224, train_per_class=1, pool_per_class=8), tmp / "sets224")
            torch.manual_seed(0)
            model = torchvision.models.resnet50(weights=None, num_classes=1000).eval()
            run_setting(rows, "resnet50 224px, untrained", None, model, "resnet50", load_set(tmp / "sets224", "pool"),
                        mean, std, args.resnet50_batches, True, 50)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    columns["machine"] = [machine()] * len(rows)
    write_table(out / "label_accuracy.parquet", columns)
    if not args.quick:
        write_doc(rows, REPO / "docs" / "label_accuracy.png", REPO / "docs" / "label_accuracy.md", command)
    print(f"wrote {out / 'label_accuracy.parquet'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
