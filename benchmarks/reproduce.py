"""Reproduction harness: the papers' table rows as commands, run over seeds, reported beside the paper.

The registry below holds one row per headline table row of the five papers this project implements
(and the DML rows they print): the script, its exact arguments, which number the paper reports
(final or best epoch; one network, the mean of the networks or the ensemble), the paper's value and
over how many seeds, and the row it is compared with (its baseline). Rows whose arguments are equal
share their runs, so a baseline printed in several tables trains once.

    python benchmarks/reproduce.py list 'tna-t1-*'                 # rows, paper values, epochs
    python benchmarks/reproduce.py run tna-t1-resnet18-cifar100    # the row and its baseline, seeds 0 1 2
    python benchmarks/reproduce.py report 'tna-t1-*'               # markdown: ours (mean ± std) beside the paper
    python benchmarks/reproduce.py run 'amln-t2-*' --dry-run --launcher "torchrun --nproc_per_node=8"

`run` trains every (row, seed) not yet finished, in runs/reproduce/<script>-<hash of the arguments>/seed<N>:
a folder with summary.json is finished and never touched again; one with checkpoint.pt continues
with `--resume`; anything else starts afresh. `--dry-run` prints the commands, one per line, for a
cluster's job script (a row that starts from another row's run, `{run:ID}`, is printed after it:
keep that order). Arguments after `--` go to every command (e.g. `-- --data-dir /data --channels-last`); they
are not part of a run's identity, so only those that do not change what a run measures (RUN_ONLY) are taken.
Another copy of a row's dataset is `--dataset NAME=SPEC`, given to `run` and `report` alike; its runs get folders
of their own. E.g. CIFAR-10 as JPEG files (accuracies land near, not at, those on the original PNG-exact images):

    python benchmarks/reproduce.py run 'tna-t1-convnet-cifar10*' --dataset cifar10=folder:PATH --seeds 0
    python benchmarks/reproduce.py report 'tna-t1-convnet-cifar10*' --dataset cifar10=folder:PATH --seeds 0

`report` prints, per row, the paper's value, ours as mean ± sample std over the finished seeds (n),
the baseline's, both gains, and whether the paper's value lies within our mean ± 2 std. Unfinished
and missing seeds are listed as such, never averaged in.

The CPU tier (`cpu-*` rows) is every method and its baseline at a scale that runs on a laptop: TNA's
ConvNet, 4 epochs of a 32x32 image set given with `--data PATH.npz` (sized on a 100-class, 10,000-image
Tiny ImageNet subset), estimated under an hour for 3 seeds on 2 cores:

    python benchmarks/reproduce.py run 'cpu-*' --data tinyimagenet100_small.npz --jobs 2
    python benchmarks/reproduce.py report 'cpu-*'

At that scale seed noise is as large as the methods' gains: the tier shows that the pipeline works and
how large the spread is, not which method wins.
"""
import argparse
import contextlib
import csv
import fnmatch
import hashlib
import importlib
import io
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("tna.py", "dml.py", "sila.py", "fdl.py", "amln.py", "css.py")
# What may follow --: how a run executes, not what it measures (runs are keyed by the row's arguments alone)
RUN_ONLY = ("--data-dir", "--device", "--amp", "--channels-last", "--compile", "--eval-every", "--stop-after")
# A script's parsed arguments that are not its run's recipe: RUN_ONLY's, those set per run, and paths (which
# differ from machine to machine)
NOT_THE_RECIPE = ({flag[2:].replace("-", "_") for flag in RUN_ONLY}
                  | {"seed", "out_dir", "resume", "overwrite", "given", "dataset", "twin_checkpoint"})
ACCURACIES = ("top1", "top2", "top5")  # stored as fractions in summary.json, printed in percent as the papers do


@dataclass(frozen=True)
class Row:
    """One printed number of a paper and the command that reproduces it.

    reads: "<output>.<metric>". output: a network's name in summary.json ("base", "student1", "net2",
    "exit3"), "deployed", "ensemble", "mean" (networks_mean) or "a+b" (the mean of networks a and b);
    metric: top1, top2, top5, nll, or best (that output's best-epoch top-1, selected on the test set).
    args may hold {data} (the --data path) and {run:ID} (that row's run folder for the same seed).
    """
    id: str
    script: str
    args: str
    reads: str
    paper: float = None  # None: the paper shows it only as a figure, or prints no number
    std: float = None
    baseline: str = None  # the id of the row this one's gain is measured against
    seeds: int = None  # runs the paper averages (None: not stated)
    source: str = ""
    note: str = ""
    also: tuple = ()  # other numbers the paper prints for the same run: ((reads, value), ...)
    dataset_from: str = None  # run's --dataset NAME=SPEC: the row trains on SPEC instead of its dataset

    @property
    def dataset(self):
        argv = self.argv
        return argv[argv.index("--dataset") + 1] if "--dataset" in argv else None

    @property
    def argv(self):
        return shlex.split(self.args)

    @property
    def epochs(self):
        argv = self.argv
        return int(argv[argv.index("--epochs") + 1]) if "--epochs" in argv else None

    @property
    def needs(self):
        """Ids of the rows whose runs this row's command starts from."""
        return [token[5:-1] for token in self.argv if token.startswith("{run:")]


# ==== recipes: each paper's stated setting (explicit, so a change of a script's defaults cannot change a row) ====
# TNA Table 9, section 3.3; the crops' padding is the mean colour, as the authors' code (it normalises first)
TNA = "--epochs 200 --batch-size 256 --lr {lr} --schedule cosine --weight-decay 5e-4 --augment meanpad"
# Tiny ImageNet: weight decay 1e-4 and RandomResizedCrop, as in the TNA authors' code (the paper is silent)
TNA_TINY = "--epochs 200 --batch-size 256 --lr {lr} --schedule cosine --weight-decay 1e-4 --augment rrc"
TNA_R50 = "--epochs 90 --batch-size 256 --lr 0.2 --schedule cosine --weight-decay 1e-4"  # Table 9
# Table 9: Adam, batch 1024, lr 1e-3, 90 epochs; choice: weight decay 1e-4 (unstated; Beyer et al. 2022's value)
TNA_VIT = "--epochs 90 --batch-size 1024 --lr 1e-3 --optimizer adam --schedule cosine --weight-decay 1e-4"
# SiLa section 4.1; the factor and the weight decay are unstated: choice: x0.5 per milestone (sila.py says why),
# and 5e-4 (1e-4 on ImageNet-100)
SILA = ("--epochs 260 --batch-size 128 --lr 0.1 --schedule multistep "
        "--milestones 30 55 80 105 135 160 180 200 220 240 --gamma 0.5 --weight-decay {wd}")
# SiLa section 4.2 ("255" read as MSDNet's 225); weight decay unstated: 1e-4, as MSDNet's code
SILA_MSD = "--epochs 300 --batch-size 64 --lr 0.1 --schedule multistep --milestones 150 225 --weight-decay 1e-4"
SILA_MSD_IN = "--epochs 90 --batch-size 256 --lr 0.1 --schedule multistep --milestones 30 60 --weight-decay 1e-4"
FDL = "--epochs 250 --batch-size 128 --lr 0.1 --nesterov --schedule cosine --weight-decay 5e-4"  # authors' code
FDL_IN = "--epochs 90 --batch-size 256 --lr 0.1 --schedule cosine --weight-decay 1e-4"  # choice: unstated
AMLN = ("--epochs 600 --batch-size 128 --lr 0.1 --schedule multistep --milestones 200 400 "  # AMLN section 4.2
        "--nesterov --weight-decay 1e-4")
AMLN_IN = "--epochs 90 --batch-size 128 --lr 0.1 --schedule multistep --milestones 30 60 --weight-decay 1e-4"
CSS = ("--epochs 300 --warmup-epochs 5 --batch-size 128 --lr 0.1 --schedule multistep --milestones 149 224 "
       "--weight-decay 5e-4")  # CSS's protocol (section 4 and its supplementary material), as css.py states it


def pairs(*printed):
    """(mean, std) pairs from a flat list of a table's printed means and stds."""
    return list(zip(printed[::2], printed[1::2]))


# ==== TNA on CNNs (anonymous submission, after Deckers et al. 2024, arXiv:2409.15849): 3 seeds per row (3.3) ====
def tna_rows():
    rows = []
    add = lambda *a, **k: rows.append(Row(*a, seeds=k.pop("seeds", 3), **k))
    # Table 1: (model, dataset, single, single std, TNA, TNA std)
    table1 = [("convnet", "cifar10", 86.84, .14, 87.07, .31), ("resnet18", "cifar10", 95.06, .05, 95.38, .18),
              ("mobilenetv2", "cifar10", 93.94, .22, 94.56, .32), ("convnet", "cifar100", 61.14, .37, 61.83, .36),
              ("resnet18", "cifar100", 77.66, .28, 79.00, .35), ("mobilenetv2", "cifar100", 76.17, .15, 79.50, .27),
              ("convnet", "tinyimagenet", 37.75, .23, 38.12, .41), ("resnet18", "tinyimagenet", 59.33, .57, 64.84, .56),
              ("mobilenetv2", "tinyimagenet", 60.10, .20, 65.11, .09)]
    for model, dataset, single, single_std, tna, tna_std in table1:
        lr = 0.05 if model == "mobilenetv2" and dataset != "cifar10" else 0.1  # Table 9
        recipe = (TNA_TINY if dataset == "tinyimagenet" else TNA).format(lr=lr)
        # Table 7: MobileNetV2 / CIFAR-100 reaches Table 1's 79.50 at alpha 5e-2 (77.86 at 5e-3)
        alpha = "5e-2" if (model, dataset) == ("mobilenetv2", "cifar100") else "5e-3"
        note = {"5e-2": "alpha 5e-2: Table 7 prints this value for it",
                "5e-3": "choice: alpha 5e-3 (the paper's default)" if model == "mobilenetv2" else ""}[alpha]
        row_id = f"tna-t1-{model}-{dataset}"
        add(f"{row_id}-single", "tna.py", f"--model {model} --dataset {dataset} --alpha 0 {recipe}", "base.top1",
            single, single_std, source="TNA Table 1", note="two independent networks; the first is read")
        add(row_id, "tna.py", f"--model {model} --dataset {dataset} --alpha {alpha} {recipe}", "base.top1",
            tna, tna_std, f"{row_id}-single", source="TNA Table 1", note=note)
    for model, alpha, recipe, single, tna in [("resnet50", "5e-4", TNA_R50, (76.61, .07), (77.65, .01)),
                                              ("vit_s16", "5e-3", TNA_VIT, (69.83, .12), (71.68, .00))]:
        row_id, note = f"tna-t1-{model}-imagenet", "possibly preliminary (< 3 seeds; the paper's red marking is lost)"
        add(f"{row_id}-single", "tna.py", f"--model {model} --dataset imagenet --alpha 0 {recipe}", "base.top1",
            *single, source="TNA Table 1", note=note, seeds=None)
        add(row_id, "tna.py", f"--model {model} --dataset imagenet --alpha {alpha} {recipe}", "base.top1",
            *tna, f"{row_id}-single", source="TNA Table 1", seeds=None,
            note=note + ("" if model == "resnet50" else "; choice: alpha 5e-3 (unstated for the ViT)"))
    # Table 2: TNA against DML at two learning rates (the authors' DML does not detach the peers)
    table2 = [("mobilenetv2", "cifar100", 0.1, (74.74, .16), (77.78, .15), (1.66, 1.15)),
              ("mobilenetv2", "cifar100", 0.05, None, None, (78.08, .34)),
              ("resnet18", "tinyimagenet", 0.1, None, None, (0.05, 0.0)),
              ("resnet18", "tinyimagenet", 0.05, (57.79, .20), (64.34, .29), (62.98, .44))]
    for model, dataset, lr, single, tna, dml in table2:
        recipe = (TNA_TINY if dataset == "tinyimagenet" else TNA).format(lr=lr)
        alpha = "5e-2" if model == "mobilenetv2" else "5e-3"
        row_id, table1_id = f"tna-t2-{model}-{dataset}-lr{lr}", f"tna-t1-{model}-{dataset}"
        baseline = f"{row_id}-single" if single else f"{table1_id}-single"  # the rows Table 1 prints are not repeated
        if single:
            add(f"{row_id}-single", "tna.py", f"--model {model} --dataset {dataset} --alpha 0 {recipe}", "base.top1",
                *single, source="TNA Table 2")
            add(row_id, "tna.py", f"--model {model} --dataset {dataset} --alpha {alpha} {recipe}", "base.top1",
                *tna, baseline, source="TNA Table 2", note=f"choice: alpha {alpha}, as in the Table 1 row")
        add(f"{row_id}-dml", "dml.py", f"--model {model} --dataset {dataset} --no-detach {recipe}", "student1.top1",
            *dml, baseline, source="TNA Table 2", note="below 2% in the paper: DML diverged" if dml[0] < 2 else "")
    # Table 3: logit-averaging ensembles of the Tiny ImageNet ResNet-18 runs above (no ensemble run of its own)
    tiny = "tna-t1-resnet18-tinyimagenet"
    for name, runs_of, (value, std) in [("single", f"{tiny}-single", (63.79, .26)), ("tna", tiny, (66.56, .24)),
                                        ("dml", "tna-t2-resnet18-tinyimagenet-lr0.05-dml", (65.04, .03))]:
        source = next(r for r in rows if r.id == runs_of)
        add(f"tna-t3-{name}-ensemble", source.script, source.args, "ensemble.top1", value, std, source.id,
            source="TNA Table 3", note="logit average of the two networks of the baseline row's runs")
    # Table 4: wider single ResNet-18s against TNA (no std printed)
    for dataset, values in [("cifar100", (77.56, 79.12, 79.22, 79.00)), ("tinyimagenet", (59.08, 60.51, 60.90, 64.65))]:
        recipe = (TNA_TINY if dataset == "tinyimagenet" else TNA).format(lr=0.1)
        for model, value in zip(("resnet18", "resnet18_w2", "resnet18_w4"), values):
            add(f"tna-t4-{model}-{dataset}", "tna.py", f"--model {model} --dataset {dataset} --alpha 0 {recipe}",
                "base.top1", value, baseline=None if model == "resnet18" else f"tna-t4-resnet18-{dataset}",
                source="TNA Table 4")
        add(f"tna-t4-tna-{dataset}", "tna.py", f"--model resnet18 --dataset {dataset} --alpha 5e-3 {recipe}",
            "base.top1", values[3], baseline=f"tna-t4-resnet18-{dataset}", source="TNA Table 4")
    # Table 7: the matching weight alpha (None: did not converge, chance accuracy)
    table7 = {("resnet18", "tinyimagenet", 0.1): (59.33, 60.98, 62.33, 63.33, 64.65, 63.79, None, None),
              ("resnet18", "cifar10", 0.1): (95.06, 95.23, 95.25, 95.43, 95.38, 95.33, None, None),
              ("mobilenetv2", "cifar100", 0.05): (76.17, 76.54, 77.12, 77.43, 77.86, 78.61, 79.50, 77.91)}
    for (model, dataset, lr), values in table7.items():
        recipe = (TNA_TINY if dataset == "tinyimagenet" else TNA).format(lr=lr)
        for alpha, value in zip(("0", "1e-4", "5e-4", "1e-3", "5e-3", "1e-2", "5e-2", "1e-1"), values):
            add(f"tna-t7-{model}-{dataset}-alpha{alpha}", "tna.py",
                f"--model {model} --dataset {dataset} --alpha {alpha} {recipe}", "base.top1", value,
                baseline=None if alpha == "0" else f"tna-t7-{model}-{dataset}-alpha0", source="TNA Table 7",
                note="" if value else "did not converge in the paper (chance accuracy)")
    # Table 8: twins of another size on Tiny ImageNet (alpha 5e-4 whenever a ResNet-50 takes part)
    recipe = TNA_TINY.format(lr=0.1)
    for base in ("resnet34", "resnet50"):
        add(f"tna-t8-{base}-single", "tna.py", f"--model {base} --dataset tinyimagenet --alpha 0 {recipe}",
            "base.top1", source="TNA Table 8", note="the paper prints no single-network value (Fig. 3 curves)")
    table8 = [("resnet18", "resnet18", 64.75, .47), ("resnet18", "resnet34", 64.51, .25),
              ("resnet18", "resnet50", 62.17, .53), ("resnet34", "resnet18", 66.26, .23),
              ("resnet34", "resnet34", 65.97, .41), ("resnet50", "resnet18", 65.08, .38),
              ("resnet50", "resnet50", 64.94, .77)]
    for base, twin, value, std in table8:
        alpha = "5e-4" if "resnet50" in (base, twin) else "5e-3"
        add(f"tna-t8-{base}-twin-{twin}", "tna.py",
            f"--model {base} --twin-model {twin} --dataset tinyimagenet --alpha {alpha} {recipe}", "base.top1",
            value, std, "tna-t1-resnet18-tinyimagenet-single" if base == "resnet18" else f"tna-t8-{base}-single",
            source="TNA Table 8")
    # Section 4.4, Fig. 4: a frozen, fully trained twin (the paper: above TNA early, below it at the end)
    add("tna-f4-frozen-twin", "tna.py", f"--model resnet18 --dataset tinyimagenet --alpha 5e-3 {recipe} "
        "--twin-checkpoint {run:tna-t1-resnet18-tinyimagenet-single} --freeze-twin", "base.top1",
        baseline=tiny, source="TNA Fig. 4", note="figure only; the twin: the trained base of the single run, same seed")
    # Section 4.4, Fig. 5: late matching on ResNet-18 / CIFAR-100 (the paper: matching from epoch 0 is best)
    recipe = TNA.format(lr=0.1)
    for epoch in (50, 100, 150):
        add(f"tna-f5-late-matching-{epoch}", "tna.py",
            f"--model resnet18 --dataset cifar100 --alpha 5e-3 --late-matching {epoch} {recipe}", "base.top1",
            baseline="tna-t1-resnet18-cifar100", source="TNA Fig. 5", note="figure only")
    # Section 4.2, progressive re-initialisation: identical twins but one layer drawn afresh ("no matter which layer
    # we initialized differently, this had no significant impact"); choice: ResNet-18 / Tiny ImageNet, the first conv,
    # a middle conv and the classifier (indices among the conv and linear layers)
    recipe = TNA_TINY.format(lr=0.1)
    for layer in (0, 10, -1):
        add(f"tna-s42-reinit-layer{layer}", "tna.py", f"--model resnet18 --dataset tinyimagenet --alpha 5e-3 {recipe} "
            f"--twin-init copy --reinit-layer {layer}", "base.top1", baseline=tiny, source="TNA section 4.2",
            note="text only: no significant change from TNA")
    return rows


# ==== SiLa (Gan, Liu, Chen and Zhang; Tables 1-3 "averaged over multiple experiments", count unstated) ====
SILA_T1 = {  # (top-1, top-5, best, NLL) of net1 (and net2); mixed groups name net1's model first
    ("mobilenet", "ind"): [(66.90, 88.50, 67.18, 1.46)], ("mobilenet", "sila"): [(69.18, 89.91, 69.45, 1.23)],
    ("mobilenet", "dml"): [(69.21, 89.92, 69.43, 1.22), (69.11, 90.13, 69.35, 1.21)],
    ("mobilenet", "sila-dml"): [(70.36, 90.92, 70.64, 1.13), (70.00, 90.93, 70.28, 1.13)],
    ("resnet18", "ind"): [(76.45, 92.95, 76.64, 0.97)], ("resnet18", "sila"): [(77.85, 93.98, 78.08, 0.85)],
    ("resnet18", "dml"): [(77.07, 93.62, 77.24, 0.87), (77.46, 93.82, 77.65, 0.87)],
    ("resnet18", "sila-dml"): [(78.13, 94.51, 78.34, 0.80), (78.03, 94.49, 78.28, 0.80)],
    ("mobilenet,resnet18", "sila"): [(69.17, 89.87, 69.40, 1.25), (77.20, 93.80, 77.40, 0.89)],
    ("mobilenet,resnet18", "dml"): [(69.86, 90.37, 70.08, 1.20), (76.62, 93.86, 76.86, 0.86)],
    ("mobilenet,resnet18", "sila-dml"): [(71.51, 91.34, 71.64, 1.10), (76.88, 94.07, 77.10, 0.83)],
    ("vgg13", "ind"): [(72.21, 90.06, 72.35, 1.28)], ("vgg13", "sila"): [(73.21, 90.91, 73.35, 1.17)],
    ("vgg13", "dml"): [(73.76, 91.70, 73.93, 1.08), (73.84, 91.76, 74.04, 1.08)],
    ("vgg13", "sila-dml"): [(74.28, 92.03, 74.51, 1.05), (74.22, 92.03, 74.41, 1.05)],
    ("mobilenet,vgg13", "sila"): [(68.88, 89.37, 69.12, 1.28), (73.62, 90.98, 73.86, 1.15)],
    ("mobilenet,vgg13", "dml"): [(69.52, 90.22, 69.74, 1.23), (73.76, 92.44, 73.96, 1.00)],
    ("mobilenet,vgg13", "sila-dml"): [(70.74, 91.13, 70.93, 1.13), (74.28, 92.78, 74.42, 0.96)],
}
SILA_T2 = {  # ImageNet-100, same layout
    ("resnet18", "ind"): [(79.09, 94.63, 79.72, 0.83)],
    ("resnet18", "sila"): [(80.39, 95.31, 80.96, 0.73), (80.47, 95.31, 80.82, 0.72)],
    ("resnet18", "dml"): [(80.24, 95.16, 81.04, 0.72), (80.30, 95.19, 81.00, 0.72)],
    ("resnet18", "sila-dml"): [(81.16, 95.71, 82.14, 0.66), (81.33, 95.40, 81.72, 0.67)],
    ("resnet34", "ind"): [(80.63, 95.10, 80.90, 0.84)],
    ("resnet34", "sila"): [(81.33, 95.32, 81.56, 0.77), (81.61, 95.83, 82.29, 0.70)],
    ("resnet34", "dml"): [(81.35, 96.04, 81.88, 0.70), (81.53, 95.94, 82.06, 0.70)],
    ("resnet34", "sila-dml"): [(82.02, 96.15, 82.30, 0.66), (82.05, 96.26, 82.50, 0.65)],
    ("resnet18,resnet34", "sila"): [(80.57, 94.98, 80.86, 0.73), (80.87, 95.58, 81.24, 0.77)],
    ("resnet18,resnet34", "dml"): [(80.94, 95.52, 81.42, 0.70), (81.70, 95.94, 82.06, 0.67)],
    ("resnet18,resnet34", "sila-dml"): [(81.08, 95.70, 81.74, 0.67), (82.14, 95.90, 82.44, 0.64)],
}
SILA_T3 = {  # AutoAugment: model -> {dataset: [(IND top-1, top-k), (SiLa net1 ...), (SiLa net2 ...)]}
    "vgg19": {"cifar10": [(94.55, 98.30), (94.77, 98.34), (94.76, 98.40)],
              "cifar100": [(73.82, 90.10), (74.12, 90.46), (74.66, 90.76)]},
    "resnet34": {"cifar10": [(96.26, 98.97), (96.45, 98.97), (96.46, 99.04)],
                 "cifar100": [(79.02, 94.67), (80.60, 95.57), (80.88, 95.52)]},
    "mobilenet": {"cifar10": [(92.19, 97.60), (92.24, 97.57), (93.71, 98.15)],
                  "cifar100": [(70.34, 90.81), (71.28, 91.09), (73.62, 92.21)]},
    "wrn_16_10": {"cifar10": [(96.66, 99.08), (96.99, 99.24), (96.91, 99.18)],
                  "cifar100": [(80.25, 95.07), (82.81, 96.57), (83.05, 96.46)]},
    "densenet121": {"cifar10": [(96.04, 98.92), (96.24, 98.92), (96.50, 99.12)],
                    "cifar100": [(80.72, 95.45), (81.23, 95.86), (81.25, 95.77)]},
}


def sila_rows():
    rows = []
    variants = {"ind": ("sila.py", "--no-sila", "net"), "sila": ("sila.py", "", "net"),
                "dml": ("dml.py", "", "student"), "sila-dml": ("sila.py", "--dml", "net")}
    for table, values, dataset, wd in [("t1", SILA_T1, "cifar100", "5e-4"), ("t2", SILA_T2, "imagenet100", "1e-4")]:
        for (models, variant), printed in values.items():
            script, flag, prefix = variants[variant]
            mixed = "," in models
            network_flag = f"--models {models}" if mixed else f"--model {models}"
            args = f"{network_flag} --dataset {dataset} {flag} {SILA.format(wd=wd)}".replace("  ", " ")
            for k, (top1, top5, best, nll) in enumerate(printed, start=1):
                net_model = models.split(",")[k - 1] if mixed else models
                row_id = f"sila-{table}-{models.replace(',', '-')}-{variant}" + (f"-net{k}" if len(printed) > 1 else "")
                also = ((f"{prefix}{k}.top5", top5), (f"{prefix}{k}.best", best), (f"{prefix}{k}.nll", nll))
                rows.append(Row(row_id, script, args, f"{prefix}{k}.top1", top1, also=also,
                                baseline=None if variant == "ind" else f"sila-{table}-{net_model}-ind",
                                source=f"SiLa Table {table[1]}"))
    for model, datasets in SILA_T3.items():
        for dataset, printed in datasets.items():
            topk = "top2" if dataset == "cifar10" else "top5"
            for variant, flag, networks in [("ind", "--no-sila", [("net1", printed[0])]),
                                            ("sila", "", [("net1", printed[1]), ("net2", printed[2])])]:
                args = f"--model {model} --dataset {dataset} {flag} --augment autoaugment {SILA.format(wd='5e-4')}"
                for net, (top1, topk_value) in networks:
                    row_id = f"sila-t3-{model}-{dataset}-{variant}" + (f"-{net}" if variant == "sila" else "")
                    rows.append(Row(row_id, "sila.py", args.replace("  ", " "), f"{net}.top1", top1,
                                    baseline=None if variant == "ind" else f"sila-t3-{model}-{dataset}-ind",
                                    also=((f"{net}.{topk}", topk_value),), source="SiLa Table 3"))
    # Dynamic SiLa on MSDNet (section 4.2): anytime (Fig. 5) and budgeted (Fig. 4) curves, no printed numbers;
    # each exit is read, the curves come from `analysis.py msdnet RUN`
    holdout = " --holdout 5000"  # budgeted: exit thresholds set on images held out from training
    for name, model, dataset, recipe, extra in [
            ("anytime-cifar100", "msdnet7", "cifar100", SILA_MSD, ""),
            ("budgeted-cifar100", "msdnet5_lingrow", "cifar100", SILA_MSD, holdout),
            ("anytime-imagenet100", "msdnet_imagenet", "imagenet100", SILA_MSD_IN, ""),
            ("budgeted-imagenet100", "msdnet_imagenet", "imagenet100", SILA_MSD_IN, holdout)]:
        figure = "Fig. 4" if name.startswith("budgeted") else "Fig. 5"
        args = f"--model {model} --dataset {dataset} {recipe}{extra}"
        rows.append(Row(f"sila-msdnet-{name}-msdnet", "sila.py", f"{args} --no-sila", "net1.top1",
                        source=f"SiLa {figure}", note="curves only: analysis.py msdnet RUN; last exit read"))
        rows.append(Row(f"sila-msdnet-{name}", "sila.py", args, "net1.top1", baseline=f"sila-msdnet-{name}-msdnet",
                        source=f"SiLa {figure}", note="curves only: analysis.py msdnet RUN; last exit read"))
    return rows


# ==== FDL (Das and Dutta Roy, poster): the best epoch, as the authors' code reports it; seeds unstated ====
def fdl_rows():
    rows = []
    for dataset, model, recipe, extra, (single, rie, fdl) in [
            ("cifar100", "vgg16", FDL, "", (74.61, 76.95, 77.02)),
            ("cifar10", "vgg16", FDL, " --fdl-lr 1e-4", (93.66, 93.7, 94.93)),
            ("imagenet", "resnet50", FDL_IN, " --head-lr 0.01", (76.38, 76.96, 77.06))]:
        base = f"--model {model} --dataset {dataset} --num-nets 2 {recipe}{extra}"
        row_id, best = f"fdl-{model}-{dataset}", "best epoch, selected on the test set (authors' code)"
        rows += [Row(f"{row_id}-single", "fdl.py", f"{base} --no-fdl --no-similarity", "base1.best", single,
                     source="FDL poster table", note=f"1x baseline: a network of the independent pair; {best}"),
                 Row(f"{row_id}-rie", "fdl.py", f"{base} --no-fdl --no-similarity", "deployed.best", rie,
                     baseline=f"{row_id}-single", source="FDL poster table",
                     note=f"RIE: two independent networks and the ensemble head; {best}"),
                 Row(f"{row_id}-x2", "fdl.py", base, "deployed.best", fdl, baseline=f"{row_id}-single",
                     source="FDL poster table", note=best)]
    for n in (3, 4):  # "Many network FDL ensembles": a figure; choice: VGG-16 on CIFAR-100
        rows.append(Row(f"fdl-vgg16-cifar100-x{n}", "fdl.py", f"--model vgg16 --dataset cifar100 --num-nets {n} {FDL}",
                        "deployed.best", baseline="fdl-vgg16-cifar100-single", source="FDL poster figure",
                        note="figure only"))
    return rows


# ==== AMLN (Zhang et al., ECCV 2020): seeds unstated ====
AMLN_T2 = {  # (vanilla, DML Avg, AMLN Avg)
    "cifar10": {"resnet32": (93.10, 93.15, 94.25), "resnet56": (93.79, 94.19, 94.68),
                "wrn_16_2": (93.58, 93.72, 94.39), "wrn_40_2": (94.71, 95.03, 95.21)},
    "cifar100": {"resnet32": (69.71, 70.98, 74.69), "resnet56": (71.76, 74.13, 75.77),
                 "wrn_16_2": (71.41, 73.27, 75.56), "wrn_40_2": (74.47, 76.49, 77.97)}}
AMLN_T3 = {  # mixed pairs: (DML net1, net2, AMLN net1, net2); vanilla as in Table 2
    "cifar10": {"wrn_16_2,resnet32": (93.91, 93.39, 94.37, 94.35), "wrn_40_2,resnet56": (94.87, 93.87, 94.94, 94.39)},
    "cifar100": {"wrn_16_2,resnet32": (73.55, 71.69, 75.88, 74.65), "wrn_40_2,resnet56": (76.67, 73.25, 76.76, 75.29)}}
AMLN_T5 = {  # against offline KD: (AMLN net1, net2, vanilla net1, net2)
    "cifar10": {"wrn_40_1,resnet20": (94.42, 93.48, 93.16, 92.22), "wrn_16_2,wrn_16_1": (94.16, 92.92, 93.73, 91.38)},
    "cifar100": {"resnet110,resnet20": (76.12, 72.44, 73.09, 68.76),
                 "resnet110,resnet56": (76.74, 74.79, 73.09, 71.06)}}
VANILLA = "--no-kl --no-adversarial --no-alignment"
AMLN_T6 = {"a": (VANILLA, 93.10, 69.71), "b": ("--no-adversarial --no-alignment", 93.15, 70.98),  # (CIFAR-10, -100)
           "c": ("--no-adversarial", 93.89, 73.24), "d": ("--no-alignment", 94.01, 74.16), "e": ("", 94.25, 74.69)}


def amln_rows():
    rows = []
    for dataset, table in AMLN_T2.items():
        for model, (vanilla, dml, amln) in table.items():
            row_id = f"amln-t2-{model}-{dataset}"
            rows += [Row(f"{row_id}-vanilla", "amln.py", f"--model {model} --dataset {dataset} {VANILLA} {AMLN}",
                         "mean.top1", vanilla, source="AMLN Table 2", note="Table 6 case A: two independent networks"),
                     Row(f"{row_id}-dml", "dml.py", f"--model {model} --dataset {dataset} {AMLN}", "mean.top1", dml,
                         baseline=f"{row_id}-vanilla", source="AMLN Table 2"),
                     Row(row_id, "amln.py", f"--model {model} --dataset {dataset} {AMLN}", "mean.top1", amln,
                         baseline=f"{row_id}-vanilla", source="AMLN Table 2")]
    for dataset, table in AMLN_T3.items():
        for models, printed in table.items():
            for method, script, values in [("dml", "dml.py", printed[:2]), ("amln", "amln.py", printed[2:])]:
                prefix = "student" if script == "dml.py" else "peer"
                for k, (model, value) in enumerate(zip(models.split(","), values), start=1):
                    rows.append(Row(f"amln-t3-{models.replace(',', '-')}-{dataset}-{method}-net{k}", script,
                                    f"--models {models} --dataset {dataset} {AMLN}", f"{prefix}{k}.top1", value,
                                    baseline=f"amln-t2-{model}-{dataset}-vanilla", source="AMLN Table 3"))
    for dataset, table in AMLN_T5.items():
        for models, printed in table.items():
            row_id, args = f"amln-t5-{models.replace(',', '-')}-{dataset}", f"--models {models} --dataset {dataset}"
            for k in (1, 2):
                rows.append(Row(f"{row_id}-vanilla-net{k}", "amln.py", f"{args} {VANILLA} {AMLN}", f"peer{k}.top1",
                                printed[1 + k], source="AMLN Table 5", note="vanilla quoted from Kim et al. 2018 (FT)"))
                rows.append(Row(f"{row_id}-net{k}", "amln.py", f"{args} {AMLN}", f"peer{k}.top1", printed[k - 1],
                                baseline=f"{row_id}-vanilla-net{k}", source="AMLN Table 5"))
    for case, (flags, cifar10, cifar100) in AMLN_T6.items():
        for dataset, value in (("cifar10", cifar10), ("cifar100", cifar100)):
            args = f"--model resnet32 --dataset {dataset} {flags} {AMLN}".replace("  ", " ")
            rows.append(Row(f"amln-t6-{case}-{dataset}", "amln.py", args, "mean.top1", value,
                            baseline=None if case == "a" else f"amln-t6-a-{dataset}", source="AMLN Table 6"))
    args = f"--model resnet34 --dataset imagenet {AMLN_IN}"  # Table 4, top-1 (top-5 too)
    rows += [Row("amln-t4-resnet34-imagenet-vanilla", "amln.py", f"{args} {VANILLA}", "mean.top1", 73.31,
                 also=(("mean.top5", 91.42),), source="AMLN Table 4"),
             Row("amln-t4-resnet34-imagenet", "amln.py", args, "mean.top1", 75.48, also=(("mean.top5", 92.54),),
                 baseline="amln-t4-resnet34-imagenet-vanilla", source="AMLN Table 4")]
    return rows


# ==== CSS (Fan et al.): mean ± std over runs (count unstated); "Ours" is read as the mean of the two networks:
# Table 4's ResNet-110 pair (80.65, 80.76) averages to Table 1's 80.71. Every CSS number is read at its best epoch
# (the authors' train.py prints the best test accuracy), and CSS runs detach neither peer nor alphas (--no-detach),
# as the authors' code ====
CSS_MODELS = {"resnet56": "resnet56_bottleneck", "resnet110": "resnet110_bottleneck", "wrn20_8": "wide_resnet20_8",
              "resnext29": "resnext29_2x64d", "pyramidnet": "pyramidnet110_a84", "se_resnet110": "se_resnet110"}
CSS_T1 = {  # DML, baseline, CSS, ensemble: mean, std each
    "resnet56": (76.14, .38, 74.28, .36, 78.20, .15, 78.93, .09),
    "resnet110": (77.92, .34, 76.21, .57, 80.71, .17, 81.56, .34),
    "wrn20_8": (79.39, .13, 78.03, .40, 81.12, .15, 81.40, .10),
    "resnext29": (80.96, .20, 79.43, .43, 82.83, .16, 83.36, .11),
    "pyramidnet": (81.15, .07, 79.52, .14, 82.07, .13, 83.26, .10),
    "se_resnet110": (78.58, .02, 76.83, .15, 80.42, .13, 81.44, .10)}
CSS_T4 = {"resnet56": (80.29, .12, 78.70, .16, 80.54, .10), "resnet110": (80.65, .16, 80.76, .21, 81.56, .15),
          "se_resnet110": (80.68, .12, 80.56, .07, 81.82, .24), "pyramidnet": (81.02, .13, 82.90, .23, 83.33, .36)}
CSS_T5 = {"a": ("--single-network --branches 4 --no-joint-labels", "net1", 79.88),
          "b": ("--single-network --branches 4", "net1", 80.15),
          "c": ("--branches 2 --fixed-weights", "ensemble", 80.97), "d": ("--branches 2", "ensemble", 81.27)}
CSS_BASELINE = "--single-network --branches 1 --no-mask"


def css_rows():
    rows = []
    for name, printed in CSS_T1.items():
        (dml, baseline, css, ensemble), model = pairs(*printed), CSS_MODELS[name]
        row_id, args = f"css-t1-{name}", f"--model {model} --dataset cifar100 {CSS}"
        css_args = f"{args} --no-detach"  # the authors detach neither peer nor alphas
        rows += [Row(f"{row_id}-baseline", "css.py", f"{args} {CSS_BASELINE}", "net1.best", *baseline,
                     source="CSS Table 1"),
                 Row(f"{row_id}-dml", "dml.py", args, "student1+student2.best", *dml, f"{row_id}-baseline",
                     source="CSS Table 1"),
                 Row(row_id, "css.py", css_args, "net1+net2.best", *css, f"{row_id}-baseline", source="CSS Table 1"),
                 Row(f"{row_id}-ensemble", "css.py", css_args, "ensemble.best", *ensemble, f"{row_id}-baseline",
                     source="CSS Table 1")]
    for name, printed in CSS_T4.items():
        net1, net2, ensemble = pairs(*printed)
        args = f"--model resnet110_bottleneck --dataset cifar100 {CSS}"
        args += ("" if name == "resnet110" else f" --net2-model {CSS_MODELS[name]}") + " --no-detach"
        rows += [Row(f"css-t4-resnet110-{name}-net1", "css.py", args, "net1.best", *net1, "css-t1-resnet110-baseline",
                     source="CSS Table 4"),
                 Row(f"css-t4-resnet110-{name}-net2", "css.py", args, "net2.best", *net2, f"css-t1-{name}-baseline",
                     source="CSS Table 4"),
                 Row(f"css-t4-resnet110-{name}-ensemble", "css.py", args, "ensemble.best", *ensemble,
                     "css-t1-resnet110-baseline", source="CSS Table 4")]
    for case, (flags, reads, value) in CSS_T5.items():
        args = f"--model resnet110_bottleneck --dataset cifar100 {flags} {CSS} --no-detach"
        rows.append(Row(f"css-t5-{case}", "css.py", args,
                        f"{reads}.best", value, baseline="css-t1-resnet110-baseline", source="CSS Table 5",
                        note="all branches' ensemble (A, B: one network of 4 branches; C, D: 2 networks x 2)"))
    for dataset, name, (baseline, css) in [("cifar10", "resnet56", ((94.26, .10), (95.01, .06))),
                                           ("cifar10", "resnet110", ((94.42, .19), (95.43, .14))),
                                           ("tinyimagenet", "resnet50", ((49.43, .50), (54.49, .73)))]:
        model = CSS_MODELS.get(name, name)
        row_id = f"css-t3-{name}-{dataset}"
        rows += [Row(f"{row_id}-baseline", "css.py", f"--model {model} --dataset {dataset} {CSS_BASELINE} {CSS}",
                     "net1.best", *baseline, source="CSS Table 3"),
                 Row(row_id, "css.py", f"--model {model} --dataset {dataset} {CSS} --no-detach", "net1+net2.best", *css,
                     f"{row_id}-baseline", source="CSS Table 3")]
    return rows


# ==== the CPU tier: every method and its baseline, small enough for 2 CPU cores ====
# TNA's ConvNet pairs, 32x32 images from --data, batch 128, cosine schedule, fp32 (bf16 autocast is slower on most CPUs)
CPU = ("--model convnet --dataset {data} --epochs %d --batch-size 128 --lr 0.1 --schedule cosine --weight-decay 5e-4 "
       "--amp off")
CPU_EPOCHS = 4
# Measured: seconds for one run of 1 epoch (start-up, the 10,000 training images, the 2,000 test images), method and
# baseline, OMP_NUM_THREADS=1, on a 2-core machine shared with other jobs (load 3-4). The tier's 36 runs with --jobs 2
# then take about 3 * (12 * 10 s + 4 * (sum - 12 * 10 s)) / 2 = 49 minutes; less on a quiet machine.
CPU_SECONDS = {"tna": (36, 38), "dml": (50, 47), "sila": (41, 50), "fdl": (97, 47), "amln": (45, 44), "css": (62, 26)}
CPU_START_SECONDS = 10
CPU_ROWS = [  # (name, script, method flags, baseline flags, what the method reports, what its baseline reports)
    ("tna", "tna.py", "--alpha 5e-3", "--alpha 0", "base.top1", "base.top1"),
    ("dml", "dml.py", "", "--kl-weight 0", "student1.top1", "student1.top1"),
    ("sila", "sila.py", "", "--no-sila", "net1.top1", "net1.top1"),
    ("fdl", "fdl.py", "--pretrain-epochs 1", "--pretrain-epochs 1 --no-fdl --no-similarity", "deployed.top1",
     "base1.top1"),
    ("amln", "amln.py", "", VANILLA, "peer1.top1", "peer1.top1"),
    ("css", "css.py", "", CSS_BASELINE, "net1.top1", "net1.top1")]


def cpu_rows():
    rows = []
    recipe = CPU % CPU_EPOCHS
    for name, script, method, baseline, reads, baseline_reads in CPU_ROWS:
        minutes = [(CPU_START_SECONDS + CPU_EPOCHS * (t - CPU_START_SECONDS)) / 60 for t in CPU_SECONDS[name]]
        rows += [Row(f"cpu-{name}-baseline", script, f"{recipe} {baseline}".strip(), baseline_reads, source="CPU tier",
                     note=f"about {minutes[1]:.0f} min per seed (measured, shared machine); the method switched off"),
                 Row(f"cpu-{name}", script, f"{recipe} {method}".strip(), reads, baseline=f"cpu-{name}-baseline",
                     source="CPU tier", note=f"about {minutes[0]:.0f} min per seed (measured, shared machine)")]
    return rows


REGISTRY = tna_rows() + sila_rows() + fdl_rows() + amln_rows() + css_rows() + cpu_rows()
ROWS = {row.id: row for row in REGISTRY}
assert len(ROWS) == len(REGISTRY), "duplicate row ids"
assert all(row.baseline in ROWS for row in REGISTRY if row.baseline), "a baseline names no row"


# ==== runs: one folder per (script, arguments) and seed ====
def fail(message, code=2):
    sys.stderr.write(f"reproduce.py: error: {message}\n")
    sys.exit(code)


def select(patterns):
    """The rows whose ids match any of the shell-style patterns (all rows for none), in registry order."""
    if not patterns:
        return list(REGISTRY)
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(row.id, p) for row in REGISTRY)]
    if unknown:
        fail(f"no row matches {', '.join(unknown)} (see `reproduce.py list`)")
    return [row for row in REGISTRY if any(fnmatch.fnmatchcase(row.id, p) for p in patterns)]


def check_data(rows, data):
    needing = sorted({row.id for row in rows if "{data}" in row.args})
    if needing and (not data or not Path(data).is_file()):
        rows = f"rows {', '.join(needing)} need" if len(needing) > 1 else f"row {needing[0]} needs"
        fail(f"{rows} --data PATH: a .npz of 32x32 RGB images (x_train, y_train, x_test, y_test), sized for 100 "
             "classes, 10,000 training and 2,000 test images" + (f"; {data} does not exist" if data else ""))


def use_datasets(overrides):
    """--dataset NAME=SPEC (e.g. cifar10=folder:PATH, CIFAR-10 exported as image files): every row that trains on
    NAME, baselines and starting runs included, trains on SPEC instead. Rewrites the registry in place."""
    names = sorted({row.dataset for row in REGISTRY if row.dataset and "{" not in row.dataset})
    for override in overrides:
        name, _, spec = override.partition("=")
        if not spec or name not in names:
            fail(f"--dataset takes NAME=SPEC, NAME one of the registry's datasets ({', '.join(names)}) and SPEC any "
                 f"--dataset the scripts accept (e.g. cifar10=folder:PATH); got {override!r}")
        for row in REGISTRY:
            if row.dataset == name:
                ROWS[row.id] = replace(row, dataset_from=spec)
    REGISTRY[:] = [ROWS[row.id] for row in REGISTRY]


def run_folder(out_dir, row, seed):
    """Rows with equal arguments share a folder: the hash covers the script and the arguments as the registry
    writes them ({data} unfilled: the CPU tier's runs are found again wherever the file lives), and for a row
    given another --dataset, that dataset's folder or file name (not its path, for the same reason)."""
    identity = f"{row.script} {row.args}"
    if row.dataset_from:
        kind, _, path = row.dataset_from.rpartition(":")
        identity += f" --dataset-from {kind + ':' if kind else ''}{Path(path).name}"
    return Path(out_dir) / f"{Path(row.script).stem}-{hashlib.sha1(identity.encode()).hexdigest()[:10]}" / f"seed{seed}"


def run_state(folder):
    """finished (summary.json), resumable (checkpoint.pt), or new (nothing usable)."""
    if (folder / "summary.json").is_file():
        return "finished"
    return "resumable" if (folder / "checkpoint.pt").is_file() else "new"


def last_epoch(folder):
    """(epoch, epochs) of the last line of a run's metrics.jsonl, or None."""
    try:
        record = json.loads((folder / "metrics.jsonl").read_text().strip().splitlines()[-1])
        return record["epoch"], record["epochs"]
    except (OSError, IndexError, ValueError, KeyError):
        return None


def command(row, seed, folder, out_dir, data, python="python", launcher=None, extra=()):
    """The command that trains (or continues) one run of a row."""
    script = os.path.relpath(REPO / row.script)
    prefix = shlex.split(launcher) if launcher else [python]
    if run_state(folder) == "resumable":
        return [*prefix, script, "--resume", str(folder), *extra]
    argv = [token.replace("{data}", str(data)) for token in row.argv]
    argv = [str(run_folder(out_dir, ROWS[token[5:-1]], seed)) if token.startswith("{run:") else token for token in argv]
    if row.dataset_from:
        argv[argv.index("--dataset") + 1] = row.dataset_from
    return [*prefix, script, *argv, "--seed", str(seed), "--out-dir", str(folder), *extra]


def plan(rows, seeds, out_dir):
    """Every (row, seed) the rows need, their baselines and the runs they start from, dependencies
    first; one entry per folder: [(folder, row, seed, folders it waits for)]."""
    ordered, seen = [], set()

    def visit(row):
        if row.id in seen:
            return
        seen.add(row.id)
        for dependency in [*row.needs, *([row.baseline] if row.baseline else [])]:
            visit(ROWS[dependency])
        ordered.append(row)

    for row in rows:
        visit(row)
    jobs, folders = [], set()
    for row in ordered:
        for seed in seeds:
            folder = run_folder(out_dir, row, seed)
            if folder not in folders:
                folders.add(folder)
                jobs.append((folder, row, seed, [run_folder(out_dir, ROWS[n], seed) for n in row.needs]))
    return jobs


# ==== reading a finished run: the number the paper reports ====
def read_value(summary, reads):
    """The number `reads` names from a summary.json dict, in the papers' units (accuracies in percent)."""
    output, metric = reads.rsplit(".", 1)
    if "+" in output:
        return statistics.fmean(read_value(summary, f"{name}.{metric}") for name in output.split("+"))
    if metric == "best":
        if output == "deployed":
            output = summary["deployed_network"]
        return 100 * summary["best"]["outputs"][output]["top1"]
    if output in ("deployed", "ensemble"):
        metrics = summary[output]
    elif output == "mean":
        metrics = summary["networks_mean"]
    else:
        metrics = summary["networks"][output]
    return 100 * metrics[metric] if metric in ACCURACIES else metrics[metric]


def parsed_command(row):
    """The row's command as its script parses it now: {argument: value} (SystemExit where it does not parse).
    Placeholders ({data}, {run:ID}: paths, which NOT_THE_RECIPE leaves out) are filled with a stand-in."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = importlib.import_module(Path(row.script).stem)
    with contextlib.redirect_stderr(io.StringIO()):
        return vars(module.parse_args(["sample" if "{" in token else token for token in row.argv]))


def recipe_changes(row, ran_with):
    """What a finished run of `row` was trained with (its summary's "args") that the row's command no longer
    gives, because a script's default or the registry changed since: ["augment='standard', now 'meanpad'"].
    Arguments that parse to None are resolved by the script at run time (fdl.py's learning rates): not compared."""
    try:
        now = parsed_command(row)
    except SystemExit:
        return [f"its row's command no longer parses ({row.args})"]
    return [f"{key}={ran_with[key]!r}, now {value!r}" for key, value in now.items()
            if key not in NOT_THE_RECIPE and value is not None and key in ran_with and ran_with[key] != value]


def collect(row, seeds, out_dir):
    """Our values of a row over the seeds: (values, notes) where notes name every seed not averaged in, among
    them runs made with another recipe than the row's command gives now."""
    values, notes = [], []
    for seed in seeds:
        folder = run_folder(out_dir, row, seed)
        if run_state(folder) == "finished":
            try:
                summary = json.loads((folder / "summary.json").read_text())
                changes = recipe_changes(row, summary.get("args", {}))
                if changes:
                    notes.append(f"seed {seed} made with {'; '.join(changes)}: not averaged (move {folder} away "
                                 "to run it anew)")
                else:
                    values.append(read_value(summary, row.reads))
            except (KeyError, TypeError, ValueError) as error:
                notes.append(f"seed {seed} unreadable ({row.reads}: {error})")
        elif folder.is_dir():
            progress = last_epoch(folder)
            notes.append(f"seed {seed} at epoch {progress[0]}/{progress[1]}" if progress else f"seed {seed} started")
    missing = len(seeds) - len(values) - len(notes)
    if missing and (values or notes):
        notes.append(f"{missing} not started")
    return values, notes


def mean_std(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(mean, std=None, digits=2):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


# ==== subcommands ====
def list_command(args):
    rows = select(args.patterns)
    width = max(len(row.id) for row in rows)
    print(f"{'row':<{width}}  {'script':<7} {'epochs':>6}  {'paper':<14} {'seeds':>5}  {'reads':<16} baseline / note")
    for row in rows:
        paper = fmt(row.paper, row.std)
        also = ", ".join(f"{reads.rsplit('.', 1)[1]} {value}" for reads, value in row.also)
        tail = "  ".join(filter(None, [row.baseline and f"vs {row.baseline}", row.source, row.note,
                                       also and f"(also {also})"]))
        seeds = row.seeds or ("?" if row.paper is not None else "-")
        print(f"{row.id:<{width}}  {Path(row.script).stem:<7} {row.epochs or '-':>6}  {paper:<14} {seeds:>5}  "
              f"{row.reads:<16} {tail}")
        if args.commands:
            print(f"    python {row.script} {row.args}")
    print(f"{len(rows)} rows; {len({(r.script, r.args) for r in rows})} distinct commands")


def start(job, args, env):
    """Start one run; an attempt killed before its first checkpoint starts afresh, its partial log removed."""
    folder, row, seed, _ = job
    if run_state(folder) == "new" and folder.is_dir():
        for stale in ("metrics.jsonl", "checkpoint.pt.tmp", "summary.json.tmp"):
            (folder / stale).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    argv = command(row, seed, folder, args.out_dir, args.data, sys.executable, args.launcher, args.extra)
    print(f"# {row.id} seed {seed}: {shlex.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.Popen(argv, env=env)


def run_command(args):
    jobs = plan(select(args.ids), args.seeds, args.out_dir)
    check_data([row for _, row, _, _ in jobs], args.data)
    todo = [job for job in jobs if run_state(job[0]) != "finished"]
    print(f"# {len(jobs)} runs: {len(jobs) - len(todo)} finished, {len(todo)} to run", file=sys.stderr)
    if args.dry_run:
        for folder, row, seed, _ in todo:
            print(shlex.join(command(row, seed, folder, args.out_dir, args.data, "python", args.launcher, args.extra)))
        return
    env = dict(os.environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    running, failed, pending = {}, [], list(todo)

    def stop(signum, frame):  # Ctrl-C or a cluster's time limit (SIGTERM): stop the runs; each keeps its checkpoint
        for process in running.values():
            process.terminate()
        for process in running.values():
            process.wait()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while pending or running:
        for folder, process in list(running.items()):
            if process.poll() is not None:
                del running[folder]
                if process.returncode:
                    failed.append(folder)
                    print(f"# failed (exit {process.returncode}): {folder}", file=sys.stderr)
        for job in list(pending):
            folder, row, seed, waits_for = job
            if any(dependency in failed for dependency in waits_for):
                pending.remove(job)
                failed.append(folder)
                print(f"# skipped, the run it starts from failed: {folder}", file=sys.stderr)
            elif len(running) < args.jobs and all(run_state(dependency) == "finished" for dependency in waits_for):
                pending.remove(job)
                running[folder] = start(job, args, env)
        time.sleep(0.2)
    if failed:
        fail(f"{len(failed)} runs did not finish: {', '.join(map(str, failed))}", code=1)


def report_rows(rows, seeds, out_dir):
    """One dict per row: the paper's numbers, ours, the baseline's, both gains, the 2-std check."""
    table = []
    for row in rows:
        values, notes = collect(row, seeds, out_dir)
        mean, std = mean_std(values) if values else (None, None)
        line = {"row": row.id, "source": row.source, "reads": row.reads, "paper": row.paper, "paper_std": row.std,
                "paper_seeds": row.seeds, "ours": mean, "ours_std": std, "n": len(values), "seeds": len(seeds),
                "unfinished": "; ".join(notes), "baseline": row.baseline, "baseline_paper": None, "baseline_ours": None,
                "baseline_n": 0, "paper_gain": None, "our_gain": None, "within_2std": None}
        if row.baseline:
            base = ROWS[row.baseline]
            base_values, _ = collect(base, seeds, out_dir)
            line.update(baseline_paper=base.paper, baseline_n=len(base_values),
                        baseline_ours=statistics.fmean(base_values) if base_values else None)
            if row.paper is not None and base.paper is not None:
                line["paper_gain"] = row.paper - base.paper
            if mean is not None and base_values:
                line["our_gain"] = mean - line["baseline_ours"]
        if row.paper is not None and std is not None:
            line["within_2std"] = abs(row.paper - mean) <= 2 * std
        table.append(line)
    return table


def status(line):
    if line["n"] == 0:
        return line["unfinished"] or "not yet run"
    ours = f"{fmt(line['ours'], line['ours_std'])} (n={line['n']})"
    return ours + (f"; {line['unfinished']}" if line["unfinished"] else "")


def with_also(rows):
    """Each row, then one row per other number its paper prints for the same run (no baseline)."""
    return [variant for row in rows for variant in [row, *(
        replace(row, id=f"{row.id}[{reads}]", reads=reads, paper=value, std=None, baseline=None, also=())
        for reads, value in row.also)]]


def report_command(args):
    rows = with_also(select(args.patterns)) if args.all else select(args.patterns)
    table = report_rows(rows, args.seeds, args.out_dir)
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
        return
    for override in args.dataset:
        print("Rows on {} trained on {}.\n".format(*override.split("=", 1)))
    print("| row | reads | paper | ours: mean ± std (n seeds) | baseline: paper / ours | gain: paper / ours "
          "| paper within ours ± 2 std |")
    print("|---|---|---|---|---|---|---|")
    for line in table:
        paper = fmt(line["paper"], line["paper_std"])
        baseline = f"{fmt(line['baseline_paper'])} / {fmt(line['baseline_ours'])}" if line["baseline"] else ""
        gain = f"{fmt(line['paper_gain'])} / {fmt(line['our_gain'])}" if line["baseline"] else ""
        within = {True: "yes", False: "no", None: "-"}[line["within_2std"]]
        print(f"| {line['row']} | {line['reads']} | {paper} | {status(line)} | {baseline} | {gain} | {within} |")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of the whole usage block
        fail(f"{message} (see --help)")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: commands.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)
    listing = add("list", help="the rows, their paper values and epochs")
    listing.add_argument("patterns", nargs="*", help="row ids or shell-style patterns ('tna-t1-*'); default all")
    listing.add_argument("--commands", action="store_true", help="print each row's command too")
    runner = add("run", help="train every (row, seed) not yet finished; after --: arguments for all")
    runner.add_argument("ids", nargs="+", help="row ids or shell-style patterns; their baselines run too")
    runner.add_argument("--dry-run", action="store_true", help="print the commands, one per line, instead of running")
    runner.add_argument("--launcher", default=None,
                        help='run each script with this instead of python, e.g. "torchrun --nproc_per_node=8"')
    runner.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (each gets OMP_NUM_THREADS = cores / jobs unless set)")
    reporter = add("report", help="ours beside the paper, one line per row")
    reporter.add_argument("patterns", nargs="*", help="row ids or shell-style patterns; default all")
    reporter.add_argument("--format", default="markdown", choices=["markdown", "csv"])
    reporter.add_argument("--all", action="store_true",
                          help="also every other number the paper prints for a row's run (top-5, best, NLL)")
    runner.add_argument("--data", default=None, help="the .npz the CPU-tier rows train on ({data} in their arguments)")
    for sub in (runner, reporter):
        sub.add_argument("--dataset", action="append", default=[], metavar="NAME=SPEC",
                         help="rows on dataset NAME train on SPEC instead, in runs of their own "
                              "(e.g. cifar10=folder:PATH); give the same to report")
        sub.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds of every row")
        sub.add_argument("--out-dir", default="runs/reproduce", help="where the runs live")
    args = parser.parse_args(argv)
    args.extra = extra
    if extra and args.command != "run":
        parser.error("arguments after -- are for `run`")
    if {"--seed", "--out-dir", "--resume"} & set(extra):
        parser.error("--seed, --out-dir and --resume are set per run by reproduce.py: use its --seeds and --out-dir")
    if "--dataset" in extra:
        parser.error("another dataset changes what a run measures: give it before --, as --dataset NAME=SPEC")
    changing = [flag for flag in (arg.split("=")[0] for arg in extra if arg.startswith("--")) if flag not in RUN_ONLY]
    if changing:
        parser.error(f"{changing[0]} after -- would change what the row's runs measure, but not their folder; "
                     f"accepted after --: {', '.join(RUN_ONLY)}")
    if args.command == "run" and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def main(argv=None):
    args = parse_args(argv)
    use_datasets(getattr(args, "dataset", []))
    if getattr(args, "dataset", None):
        rows = select(args.ids if args.command == "run" else args.patterns)
        unused = [o for o in args.dataset if o.partition("=")[0] not in {row.dataset for row in rows}]
        if unused:
            fail(f"no selected row trains on the dataset of --dataset {', '.join(unused)}")
    {"list": list_command, "run": run_command, "report": report_command}[args.command](args)


if __name__ == "__main__":
    main()
