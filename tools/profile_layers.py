#!/usr/bin/env python
"""Where a training step's time goes: forward and backward milliseconds and counted FLOPs of every layer of the
two-tower network (default options, tower by tower) and of torchvision's `alexnet`, at one batch size on the CPU.

How: each network is written out as its sequence of layers (`two_tower_layers`, `torchvision_layers`; a test checks
that the sequence computes exactly what the model's own forward does). One real forward and backward through that
sequence records every layer's input and the gradient its output receives. Then, in interleaved repeats over both
networks, every layer is run on its own by hand: its input as a fresh tensor (a clone, made outside the timed
region, so in-place layers can run), the forward timed, then `torch.autograd.grad` of its outputs with the
recorded output gradient towards its input and the parameters, timed (that backward computes exactly what the
step's backward computes for this layer: no input gradient where the step has none, no accumulation into `.grad`).
The CPU runs every op synchronously, so wall-clock time around a layer is that layer's time. FLOPs are what
`FlopCounterMode` counts in each layer's forward and backward (convolutions and matrix products; the LRN's forward
window sums are a 1x1 convolution, so they count, its backward's are additions, which do not). Medians of the
repeats; the whole step, timed the usual way in the same run, says how much of it the layers add up to (the rest:
autograd's bookkeeping between layers, allocator effects).

`python tools/profile_layers.py [--batch 32] [--repeats 5] [--threads N] [--json out.json]` prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from repro.measure import forward_backward, per_tower, seconds_per_call
from repro.model import AlexNet, exchange

# A layer: (name, kind, run). `run` maps the list of per-tower inputs to the list of per-tower outputs (one tensor
# each for torchvision's single-device network).
Layer = tuple[str, str, Callable[[list[torch.Tensor]], list[torch.Tensor]]]
KINDS = ("pad", "conv", "relu", "lrn", "spatial norm", "pool", "exchange", "flatten", "fc", "dropout", "loss")


def two_tower_layers(model: AlexNet) -> list[Layer]:
    """The tower path of `AlexNet.forward` (`Tower.stem`, `trunk`, `head6`, `head7`, the exchanges, fc8) as layers,
    each layer run for every tower; the logits come out of the last one."""
    towers, devices, first = model.towers, model.devices, model.towers[0]

    def each(fn):
        return lambda xs: [fn(tower, x) for tower, x in zip(towers, xs)]

    def exchange_at(where: str) -> Layer:
        return (f"exchange ({where} input)", "exchange", lambda xs: exchange(xs, devices))

    def relu(name: str) -> Layer:
        return (name, "relu", each(lambda tower, x: F.relu(x, inplace=True)))

    layers: list[Layer] = []
    if first.right_bottom_pad:
        layers.append(("pad conv1 input", "pad", model.conv1_inputs))
    layers.append(("conv1", "conv", each(lambda tower, x: tower.conv1(x))))
    lrn1 = ("lrn1", "lrn", each(lambda tower, x: tower.lrn1(x)))
    layers += [lrn1, relu("relu1")] if first.lrn1_before_relu else [relu("relu1"), lrn1]
    layers += [("pool1", "pool", each(lambda tower, x: tower.pool(x))),
               ("conv2", "conv", each(lambda tower, x: tower.conv2(x))), relu("relu2"),
               ("lrn2", "lrn", each(lambda tower, x: tower.lrn2(x)))]
    if not isinstance(first.spatial_norm, nn.Identity):
        layers.append(("spatial norm", "spatial norm", each(lambda tower, x: tower.spatial_norm(x))))
    layers += [("pool2", "pool", each(lambda tower, x: tower.pool(x))), exchange_at("conv3")]
    for i in (3, 4, 5):
        layers += [(f"conv{i}", "conv", each(lambda tower, x, i=i: getattr(tower, f"conv{i}")(x))), relu(f"relu{i}")]
    layers += [("pool5", "pool", each(lambda tower, x: tower.pool(x))),
               ("flatten", "flatten", each(lambda tower, x: torch.flatten(x, 1)))]
    for i in (6, 7):
        layers += [exchange_at(f"fc{i}"), (f"fc{i}", "fc", each(lambda tower, x, i=i: getattr(tower, f"fc{i}")(x))),
                   relu(f"relu{i}"), (f"dropout{i}", "dropout", each(lambda tower, x, i=i:
                                                                      getattr(tower, f"dropout{i}")(x)))]
    layers += [("exchange (fc8 input)", "exchange", lambda xs: exchange(xs, devices[:1])),
               ("fc8", "fc", lambda xs: [model.fc8(xs[0])])]
    return layers


def torchvision_layers(model: torchvision.models.AlexNet) -> list[Layer]:
    """torchvision's `alexnet` module by module, named like the two-tower layers (fc6 is classifier[1])."""
    kinds = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.MaxPool2d: "pool", nn.Linear: "fc", nn.Dropout: "dropout"}
    layers, weighted = [], 0  # conv and fc layers so far: conv1..conv5, fc6..fc8
    for module in [*model.features, model.avgpool, nn.Flatten(), *model.classifier]:
        kind = kinds.get(type(module), "pool" if isinstance(module, nn.AdaptiveAvgPool2d) else "flatten")
        weighted += kind in ("conv", "fc")
        if kind in ("conv", "fc"):
            name = f"{kind}{weighted}"
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            name = "avgpool (6x6 to 6x6)"
        elif kind == "dropout":
            name = f"dropout{weighted + 1}"  # torchvision drops the inputs of fc6 and fc7
        elif kind == "flatten":
            name = kind
        else:
            name = f"{kind}{weighted}"
        layers.append((name, kind, lambda xs, module=module: [module(xs[0])]))
    return layers


def run_layers(layers: Sequence[Layer], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    for _, _, run in layers:
        inputs = run(inputs)
    return inputs


def unique(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor once (both towers may get the very same input tensor)."""
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class Profile:
    """One network's layers with their recorded inputs and output gradients, ready to time one by one."""

    def __init__(self, layers: list[Layer], inputs: list[torch.Tensor], labels: torch.Tensor,
                 params: list[torch.Tensor]):
        self.layers, self.params = layers, params
        self.leaves, self.output_grads = [], []
        outputs = []
        xs = inputs
        for _, _, run in layers:
            detached = {id(x): x.detach().requires_grad_(x.requires_grad) for x in unique(xs)}
            leaves = [detached[id(x)] for x in xs]  # a tensor both towers get stays one tensor
            self.leaves.append(leaves)
            xs = run(self.fresh(leaves))
            outputs.append(xs)
        logits = xs[0].detach().requires_grad_()
        self.logits, self.labels = logits, labels
        grads = list(torch.autograd.grad(F.cross_entropy(logits, labels), [logits]))
        for i in reversed(range(len(layers))):  # back through the layers, each output gradient recorded on the way
            self.output_grads.insert(0, grads)
            grads = self.backward(outputs[i], self.leaves[i], grads)[0]

    @staticmethod
    def fresh(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """The layer's input as the step would hand it over: a non-leaf where it needs a gradient (so in-place
        layers may write into it), the same tensor where towers share it."""
        clones = {id(leaf): leaf.clone() if leaf.requires_grad else leaf for leaf in unique(leaves)}
        return [clones[id(leaf)] for leaf in leaves]

    def backward(self, outputs, leaves, grads):
        """Gradients towards the layer's inputs (in the order of `leaves`, None where none is needed) and params."""
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        if not pairs:
            return [None] * len(leaves), []
        wanted = [leaf for leaf in unique(leaves) if leaf.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wanted + self.params, [g for _, g in pairs],
                                  allow_unused=True)
        by_leaf = dict(zip(map(id, wanted), got[:len(wanted)]))
        return [by_leaf.get(id(leaf)) for leaf in leaves], got[len(wanted):]

    def time_layer(self, i: int) -> tuple[float, float]:
        inputs = self.fresh(self.leaves[i])
        start = time.perf_counter()
        outputs = self.layers[i][2](inputs)
        middle = time.perf_counter()
        self.backward(outputs, self.leaves[i], self.output_grads[i])
        return middle - start, time.perf_counter() - middle

    def time_loss(self) -> tuple[float, float]:
        start = time.perf_counter()
        loss = F.cross_entropy(self.logits, self.labels)
        middle = time.perf_counter()
        torch.autograd.grad(loss, [self.logits])
        return middle - start, time.perf_counter() - middle

    def flops(self, i: int) -> tuple[int, int]:
        inputs = self.fresh(self.leaves[i])
        with FlopCounterMode(display=False) as forward:
            outputs = self.layers[i][2](inputs)
        with FlopCounterMode(display=False) as backward:
            self.backward(outputs, self.leaves[i], self.output_grads[i])
        return forward.get_total_flops(), backward.get_total_flops()


def profile(batch: int = 32, repeats: int = 5, seed: int = 0) -> dict:
    """Per-layer forward/backward milliseconds and FLOPs of one training step of each network, medians of
    `repeats` interleaved repeats; see the module docstring for the method."""
    load_before = os.getloadavg()[0]
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, 224, 224) * 60
    labels = torch.randint(0, 1000, (batch,))
    two_tower = AlexNet().train()
    vision = torchvision.models.alexnet(weights=None).train()
    nets = {"two-tower (default options)":
            (two_tower, two_tower_layers(two_tower), per_tower(x, two_tower.devices)),
            "torchvision alexnet": (vision, torchvision_layers(vision), [x])}
    profiles = {name: Profile(layers, inputs, labels, list(model.parameters()))
                for name, (model, layers, inputs) in nets.items()}
    samples = {name: {"layers": [([], []) for _ in p.layers], "loss": ([], []), "step": []}
               for name, p in profiles.items()}
    for repeat in range(repeats + 1):  # the first round warms up and is dropped
        for name, p in profiles.items():
            timings = [p.time_layer(i) for i in range(len(p.layers))] + [p.time_loss()]
            model = nets[name][0]  # forward, loss and backward as one, as a training step runs them (no update)
            step = seconds_per_call(forward_backward(model, x, labels), ["cpu"], 1)
            model.zero_grad(set_to_none=True)
            if repeat == 0:
                continue
            for (fwd, bwd), (f, b) in zip(samples[name]["layers"] + [samples[name]["loss"]], timings):
                fwd.append(f)
                bwd.append(b)
            samples[name]["step"].append(step)
    ms = lambda values: 1e3 * statistics.median(values)  # noqa: E731
    networks = {}
    for name, p in profiles.items():
        rows = []
        for i, (layer_name, kind, _) in enumerate(p.layers):
            fwd, bwd = samples[name]["layers"][i]
            flops = p.flops(i)
            rows.append({"name": layer_name, "kind": kind, "forward_ms": ms(fwd), "backward_ms": ms(bwd),
                         "forward_flops": flops[0], "backward_flops": flops[1]})
        fwd, bwd = samples[name]["loss"]
        rows.append({"name": "cross-entropy loss", "kind": "loss", "forward_ms": ms(fwd), "backward_ms": ms(bwd),
                     "forward_flops": 0, "backward_flops": 0})
        networks[name] = {"layers": rows, "layers_total_ms": sum(r["forward_ms"] + r["backward_ms"] for r in rows),
                          "whole_step_ms": ms(samples[name]["step"])}
    return {"batch": batch, "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_before_after": [load_before, os.getloadavg()[0]], "networks": networks}


def by_kind(rows: list[dict]) -> dict[str, dict]:
    totals = {}
    for row in rows:
        t = totals.setdefault(row["kind"], {"forward_ms": 0.0, "backward_ms": 0.0, "flops": 0})
        t["forward_ms"] += row["forward_ms"]
        t["backward_ms"] += row["backward_ms"]
        t["flops"] += row["forward_flops"] + row["backward_flops"]
    return totals


def render(result: dict) -> str:
    """The profile as markdown: both networks by kind of layer side by side, then each layer of each."""
    g = 1e9
    names = list(result["networks"])
    load = result["load_average_before_after"]
    lines = [f"Per-layer profile of one training step at batch {result['batch']} ({result['threads']} threads, "
             f"torch {result['torch']}, load average {load[0]:.1f} before and {load[1]:.1f} after; medians of "
             f"{result['repeats']} interleaved repeats; each layer timed on its own, `tools/profile_layers.py`).", "",
             "| kind of layer | " + " | ".join(f"{n}: fwd + bwd ms (GFLOP)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    kinds = {name: by_kind(result["networks"][name]["layers"]) for name in names}
    for kind in KINDS:
        cells = []
        for name in names:
            t = kinds[name].get(kind)
            cells.append(f"{t['forward_ms']:.1f} + {t['backward_ms']:.1f} ({t['flops'] / g:.2f})" if t else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("| **sum of the layers** | " + " | ".join(
        f"**{result['networks'][n]['layers_total_ms']:.0f} ms**" for n in names) + " |")
    lines.append("| the whole forward + loss + backward, timed as one | " + " | ".join(
        f"{result['networks'][n]['whole_step_ms']:.0f} ms" for n in names) + " |")
    for name in names:
        lines += ["", f"{name}, layer by layer:", "", "| layer | forward ms | backward ms | forward GFLOP | "
                  "backward GFLOP |", "|---|---|---|---|---|"]
        for row in result["networks"][name]["layers"]:
            lines.append(f"| {row['name']} | {row['forward_ms']:.1f} | {row['backward_ms']:.1f} | "
                         f"{row['forward_flops'] / g:.3f} | {row['backward_flops'] / g:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=str, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = profile(args.batch, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
