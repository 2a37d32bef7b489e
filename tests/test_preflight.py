"""`make preflight` (repro/preflight.py) and the measurements it shares with `make bench` (repro/measure.py): the
whole preflight without GPUs, failures and bad arguments, the exchange check on fake GPUs, and timers and memory
probes that cover every device of the model."""

import functools
import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from repro import measure, preflight
from repro import model as model_module
from repro.cli import preflight_main
from repro.config import SpeedConfig
from repro.measure import (CrossDeviceCopies, TrainingStep, exchange_copies, exchange_rounds, gpu_peak_memory,
                           mirrored, sync)
from repro.model import AlexNet, Dropout

TOOLS = Path(__file__).resolve().parents[1] / "tools"
GPU_CHECKS = ("numerics-towers", "placement-exchange", "speed-memory", "speed-overlap", "speed-exchange")


def run_main(capsys, *argv) -> tuple[int, list[str], str]:
    code = preflight_main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def test_the_whole_preflight_runs_and_passes_without_gpus(tmp_path, capsys, monkeypatch):
    processes = []
    run_process = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: processes.append(args) or run_process(args, **kw))
    code, lines, _ = run_main(capsys, f"out={tmp_path}", "batch_size=1", "repeats=1")
    assert code == 0, "\n".join(lines)
    statuses = dict(line.split(":", 1)[0].split(" ")[::-1] for line in lines[:-1])
    assert list(statuses) == list(preflight.CHECKS)  # one line per check, in order
    expected_skips = {*GPU_CHECKS, "speed-store"}  # no GPUs here, and no store given
    assert {name for name, status in statuses.items() if status == "SKIP"} == expected_skips
    assert {name for name, status in statuses.items() if status == "PASS"} == set(preflight.CHECKS) - expected_skips
    assert lines[-1].startswith("preflight: every check that ran passed (10 passed, 0 failed, 6 skipped")
    record = json.loads((tmp_path / "preflight.json").read_text())
    assert record["passed"] and record["first_failure"] is None and record["devices"] == ["cpu", "cpu"]
    assert set(record["skipped"]) == expected_skips
    assert all("GPU" in record["skipped"][name] for name in GPU_CHECKS)  # each says why
    checks = {c["name"]: c for c in record["checks"]}
    assert [c["name"] for c in record["checks"]] == list(preflight.CHECKS)
    assert max(checks["numerics-grouped"]["details"]["errors"]["gradients"].values()) < preflight.GRADIENT_TOLERANCE
    assert min(checks["numerics-autocast"]["details"]["cosines"]["fp16"].values()) > preflight.COSINE_FLOORS["fp16"]
    assert checks["randomness-resume"]["details"]["different"] == []
    # the resume runs in a process of its own, as after a real restart (a new process may choose other kernels)
    resumes = [args for args in processes if args[0] == sys.executable and any("resumed" in a for a in args)]
    assert len(resumes) == 1 and "deterministic=true" in resumes[0]
    assert checks["randomness-dropout"]["details"]["repeat"] is True
    assert set(checks["speed-host-syncs"]["details"]["syncs"]) == {"float32", "channels_last", "bf16", "fp16",
                                                                  "grouped"}
    assert checks["speed-step"]["details"]["options"]["float32"]["images_per_s"] > 0
    assert checks["speed-projection"]["details"]["projections"]["float32"]["run_s"] > 0


def test_a_failing_check_makes_the_preflight_fail_naming_it_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "TORCH_FLOOR", "99.0")
    monkeypatch.setattr(preflight, "Augment", None)  # placement-input cannot run: a check that raises has failed
    code, lines, _ = run_main(capsys, "checks=[speed-store,inventory,placement-input]", f"out={tmp_path}")
    assert code == 1
    assert lines[0].startswith("SKIP speed-store: no prepared store given")
    assert lines[1].startswith(f"FAIL inventory: torch {torch.__version__} is older than 99.0")
    assert lines[2].startswith("FAIL placement-input: TypeError:")
    assert lines[-1].startswith("preflight: FAIL: inventory failed first (0 passed, 2 failed, 1 skipped)")
    record = json.loads((tmp_path / "preflight.json").read_text())
    assert not record["passed"] and record["first_failure"] == "inventory"
    assert "Traceback" in record["checks"][2]["details"]["traceback"]


@pytest.mark.parametrize("argv, message", [
    (["batch_size=0"], "batch_size=0"),
    (["checks=[inventory,speed]"], "checks=['speed']"),
    (["devices=[cpu]"], "devices"),
    (["devices=[cuda:0,cuda:1]"], "cuda:0"),
    (["store={tmp}"], "is not a complete prepared store"),
    (["frobnicate=1"], "frobnicate"),
    (["--batch"], "key=value"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    assert preflight_main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("repro-preflight: error: ") and message in err


def test_dropout_check_fails_when_the_towers_draw_the_same_masks(monkeypatch):
    drop = Dropout.forward

    def reseeded(self, x):  # every dropout layer starts from the same generator state: both towers drop alike
        torch.manual_seed(7)
        return drop(self, x)

    box = preflight.Box(["cpu", "cpu"], 2, 1, 1, None, 0, False, Path("."))
    assert preflight.check_randomness_dropout(box).status == "PASS"
    monkeypatch.setattr(Dropout, "forward", reseeded)
    result = preflight.check_randomness_dropout(box)
    assert result.status == "FAIL" and result.details["tower_agreement"] == [1.0, 1.0]


def test_numerics_comparison_catches_a_tf32_sized_error():
    generator = torch.Generator().manual_seed(0)
    reference = {"logits": torch.randn(2, 10, generator=generator), "loss": torch.tensor(2.3),
                 "grads": {"a.conv1.weight": torch.randn(5, generator=generator), "fc8.bias": torch.ones(3)}}
    same = {**reference, "grads": dict(reference["grads"])}
    assert preflight.against_reference(same, reference)[0]
    off = {**same, "grads": {**same["grads"], "a.conv1.weight": reference["grads"]["a.conv1.weight"] * 1.01}}
    ok, text, errors = preflight.against_reference(off, reference)
    assert not ok and "a.conv1.weight" in text
    assert errors["gradients"]["a.conv1.weight"] == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("one_tensor", [False, True], ids=["per-tower inputs", "one image tensor"])
def test_the_expected_exchange_is_the_forward_pass_on_two_fake_gpus(one_tensor):
    devices = ("cuda:0", "cuda:1")
    with FakeTensorMode():
        model = AlexNet(devices=devices).train()
        inputs = [torch.empty(2, 3, 224, 224, device=d) for d in devices]
        with CrossDeviceCopies() as recorder:
            model(inputs[0] if one_tensor else inputs)
    image_copy = [("cuda:0", "cuda:1", (2, 3, 224, 224))] if one_tensor else []
    assert sorted(recorder.copies) == sorted(exchange_copies(2, devices) + image_copy)


def fake_two_device_step(one_tensor: bool):
    # The autograd engine asks CUDA about its devices when a backward pass touches (fake) CUDA tensors, so the whole
    # check (forward and backward) runs on two fake devices that need no driver: the CPU and `meta`.
    devices = ("cpu", "meta")
    with FakeTensorMode():
        model = AlexNet(devices=devices).train()
        inputs = [torch.empty(2, 3, 224, 224, device=d) for d in devices]
        return preflight.exchange_placement(model, inputs[0] if one_tensor else inputs,
                                            torch.zeros(2, dtype=torch.long))


def test_exchange_check_passes_on_exactly_the_exchange_forward_and_back():
    result = fake_two_device_step(one_tensor=False)
    assert result.status == "PASS" and result.summary.startswith("7 copies forward (pool2, pool5, fc6 both ways, "
                                                                 "fc7 to fc8) in 4 rounds, one per exchange")
    expected = exchange_copies(2, ("cpu", "meta"))
    assert sorted(result.details["forward"]) == sorted(expected)
    assert sorted(result.details["backward"]) == sorted(mirrored(expected))


def test_exchange_check_fails_when_the_towers_would_take_turns(monkeypatch):
    def tower_by_tower(parts, devices):  # each destination's copies, then its concatenation, as before issue 19
        return [torch.cat([part.to(device) for part in parts], dim=1) for device in devices]

    monkeypatch.setattr(model_module, "exchange", tower_by_tower)
    result = fake_two_device_step(one_tensor=False)
    assert result.status == "FAIL" and result.summary.startswith(
        "forward: the copies were dispatched in 7 rounds ([1, 1, 1, 1, 1, 1, 1] copies), not one round per exchange "
        "([2, 2, 2, 1])")


def test_backward_sends_each_exchange_s_gradients_before_the_earlier_layers():
    # The autograd engine runs each device's ready nodes latest-created first (engine.h's CompareNodeTaskTime), so a
    # gradient copy, created after the stage it feeds, goes out before that stage's backward queues anything. On
    # the fake CPU/meta pair one thread runs both devices' nodes, by the same rule; only the sum of a gradient's two
    # halves (the local one and the copied one) falls between the copies of one exchange.
    devices = ("cpu", "meta")
    with FakeTensorMode():
        model = AlexNet(devices=devices).train()
        loss = F.cross_entropy(model([torch.empty(2, 3, 224, 224, device=d) for d in devices]),
                               torch.zeros(2, dtype=torch.long))
        with OpNames() as recorder:
            loss.backward()
    between = [name for copies in recorder.between_copies(exchange_rounds(2, devices)) for name in copies]
    assert set(between) == {"aten.add.Tensor"}


class OpNames(CrossDeviceCopies):
    """Also records the name of every other op, in order, with each copy's place among them."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        copies = len(self.copies)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.ops.append(self.copies[-1] if len(self.copies) > copies else str(func))
        return out

    def between_copies(self, rounds) -> list[list[str]]:
        """For each exchange (its gradients: `rounds` mirrored), the ops between its first and last copy."""
        positions = [i for i, op in enumerate(self.ops) if isinstance(op, tuple)]
        spans, start = [], 0
        for exchange in reversed(rounds):
            span = positions[start:start + len(exchange)]
            assert sorted(self.ops[i] for i in span) == sorted(mirrored(exchange))
            spans.append([op for op in self.ops[span[0]:span[-1] + 1] if not isinstance(op, tuple)
                          and not op.startswith("prim.")])
            start += len(exchange)
        return spans


def test_exchange_check_fails_on_an_extra_copy_and_names_it():
    result = fake_two_device_step(one_tensor=True)  # the float image crosses to tower 1 (defect 7)
    assert result.status == "FAIL"
    assert result.summary == "forward: unexpected [('cpu', 'meta', (2, 3, 224, 224))]"


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's synchronize and memory counters replaced by recorders (nothing initialises CUDA)."""
    calls = {"synchronize": [], "reset": []}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls["synchronize"].append(str(device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: calls["reset"].append(str(device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: {"cuda:0": 5, "cuda:1": 7}[str(device)])
    return calls


def test_the_training_step_timer_waits_for_every_device_of_the_model(fake_cuda):
    with FakeTensorMode():
        step = TrainingStep(AlexNet(devices=("cuda:0", "cuda:1")), SpeedConfig(), 2)
    assert [str(x.device) for x in step.inputs] == ["cuda:0", "cuda:1"]  # each tower's batch already on its GPU
    step.step = lambda: None  # a backward pass of fake CUDA tensors needs a driver; the timer is under test
    step.seconds(3)
    assert fake_cuda["synchronize"] == ["cuda:0", "cuda:1"] * 2  # before and after: both GPUs, each once
    sync(["cpu", "cuda:1", "cuda:1"])
    assert fake_cuda["synchronize"][-1:] == ["cuda:1"]


def test_peak_memory_is_reset_and_read_on_every_gpu(fake_cuda):
    ran = []
    assert gpu_peak_memory(lambda: ran.append(1), ["cuda:0", "cuda:1", "cuda:1"]) == {"cuda:0": 5, "cuda:1": 7}
    assert ran == [1] and fake_cuda["reset"] == ["cuda:0", "cuda:1"]
    assert fake_cuda["synchronize"] == ["cuda:0", "cuda:1"] * 2
    assert gpu_peak_memory(lambda: None, ["cpu", "cpu"]) == {}


def test_bench_uses_the_shared_measurements(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    import bench

    for name in ("TrainingStep", "build", "sync", "seconds_per_call", "gpu_peak_memory", "training_flops_per_image",
                 "tower_alone", "exchange_copies", "IMAGENET_TRAIN", "median_ms"):
        assert getattr(bench, name) is getattr(measure, name), name


def test_the_stores_read_rate_is_set_against_the_step_and_bounds_the_projection(demo_store):
    box = preflight.Box(["cpu", "cpu"], 4, 1, 1, demo_store, 0, False, Path("."))
    box.cache["timings"] = {"float32": {"images_per_s": 1e6}, "bf16": {"images_per_s": 2e6}}  # faster than any disk
    result = preflight.check_speed_store(box)
    rate = result.details["images_per_s"]
    assert result.status == "PASS" and 0 < rate < 1e6
    assert "the float32 step consumes 1,000,000" in result.summary and "input-bound" in result.summary
    projection = preflight.check_speed_projection(box)
    assert projection.details["projections"]["bf16"]["images_per_s"] == rate  # the store is the bound
    assert projection.details["projections"]["bf16"]["run_s"] == pytest.approx(90 * 1_281_167 / rate)
    assert "read-bound" in projection.summary
    alone = preflight.Box(["cpu", "cpu"], 4, 1, 1, demo_store, 0, False, Path("."))  # checks=[speed-projection]
    alone.cache["timings"] = box.cache["timings"]
    projection = preflight.check_speed_projection(alone)  # reads the store itself
    assert "read-bound" in projection.summary and 0 < alone.cache["store_rates"]["loader"] < 1e6


def cuda_box(*devices: str) -> "preflight.Box":
    return preflight.Box(list(devices), 128, 1, 1, None, 0, False, Path("."))


@pytest.mark.parametrize("capability, arch_list, expected", [
    ((9, 0), ["sm_80", "sm_90"], True), ((8, 6), ["sm_80"], True), ((8, 0), ["sm_86"], False),
    ((12, 0), ["sm_80", "sm_90", "sm_100"], False), ((12, 0), ["sm_90", "compute_90"], True),
    ((9, 0), ["sm_90a"], True), ((10, 0), ["sm_90a"], False), ((9, 0), [], None)])
def test_the_wheel_s_kernels_against_a_gpu_s_capability(capability, arch_list, expected):
    assert preflight.has_kernels(capability, arch_list) is expected


@pytest.mark.parametrize("capability, status, says", [
    ((9, 0), "PASS", "cuda:0 Fake GPU (80.0 GiB, sm 9.0, bf16 native)"),
    ((7, 0), "PASS", "cuda:0 Fake GPU (80.0 GiB, sm 7.0, bf16 NOT native)"),
    ((12, 0), "FAIL", "cuda:0 Fake GPU (sm 12.0) has no kernels in this torch build (built for sm_70 sm_80 sm_90)")])
def test_the_inventory_checks_each_gpu_against_the_build(monkeypatch, capability, status, says):
    properties = {0: (9, 0), 1: capability}  # the model's first GPU is fine; the second is the one under test
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
        name="Fake GPU", total_memory=80 * 2**30, major=properties[torch.device(device).index][0],
        minor=properties[torch.device(device).index][1]))
    result = preflight.check_inventory(cuda_box("cuda:1", "cuda:0"))
    assert result.status == status and says.replace("cuda:0", "cuda:1") in result.summary
    assert preflight.bf16_native([torch.device("cuda:0"), torch.device("cuda:1")]) is (capability[0] >= 8)


@pytest.mark.parametrize("environment, address, status, says", [
    ({}, "127.0.1.1", "PASS", "one process: box0 resolves to 127.0.1.1 (no other box reaches it: before training "
                              "on several boxes, set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "127.0.1.1", "PASS", "torchrun, one box"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "127.0.1.1", "FAIL",
     "torchrun, 4 processes on several boxes: box0 resolves to 127.0.1.1, which no other box reaches"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "10.1.2.3", "PASS", "box0 resolves to 10.1.2.3"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "eth0"}, "127.0.1.1", "PASS",
     "GLOO_SOCKET_IFNAME=eth0, gloo talks on that interface")])
def test_the_network_check_fails_across_boxes_on_a_loopback_address(monkeypatch, environment, address, status, says):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(socket, "gethostname", lambda: "box0")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [(2, 1, 6, "", (address, 0))])
    result = preflight.check_network(cuda_box("cpu", "cpu"))
    assert result.status == status and says in result.summary


def test_the_tower_check_runs_with_one_gpu(monkeypatch):
    # devices=[cuda:0,cuda:0] trains the tower path (speed.grouped is off by default): the check runs it there too
    monkeypatch.setattr(preflight, "AlexNet", functools.partial(AlexNet, width=1 / 16))  # narrow: fast
    box = preflight.Box(["cpu", "cpu"], 1, 1, 1, None, 0, False, Path("."))
    assert preflight.check_numerics_towers(box).status == "SKIP"
    box.gpus, box.numerics_batch = [torch.device("cpu")], 1  # one "GPU" holding both towers
    result = preflight.check_numerics_towers(box)
    assert result.status == "PASS" and result.summary.startswith("the tower path on cpu, cpu: weights from seed 0")


def test_the_overlap_check_fails_when_the_towers_take_turns(monkeypatch):
    box = cuda_box("cuda:0", "cuda:1")
    model = SimpleNamespace(towers=["tower 0", "tower 1"], devices=box.devices)
    monkeypatch.setattr(preflight, "build", lambda options, devices: model)
    monkeypatch.setattr(preflight, "TrainingStep", lambda m, options, batch: SimpleNamespace(
        model=m, inputs=[None, None], labels=None))
    monkeypatch.setattr(preflight, "forward_backward", lambda m, inputs, labels: "both towers")
    monkeypatch.setattr(preflight, "tower_alone", lambda tower, x: tower)
    box.cache["exchange"] = {"ms": 0.5, "bytes": 0, "copies": 14}
    for both, status in ((11.0, "PASS"), (19.0, "FAIL")):
        times = {"both towers": both, "tower 0": 10.0, "tower 1": 9.5}
        monkeypatch.setattr(preflight, "median_ms", lambda work, devices, steps, repeats: times[work])
        result = preflight.check_speed_overlap(box)
        assert result.status == status and f"{both / 10:.2f}x the slower tower" in result.summary
        assert ("the towers take turns" in result.summary) is (status == "FAIL")




def test_a_jpeg_stores_read_rate_is_measured_in_the_loader_and_on_a_gpu_with_nvjpeg(demo_store, demo_jpeg_store,
                                                                                       monkeypatch):
    box = preflight.Box(["cpu", "cpu"], 4, 1, 1, demo_jpeg_store, 0, False, Path("."))
    box.cache["timings"] = {"float32": {"images_per_s": 1e6}}
    result = preflight.check_speed_store(box)
    assert result.status == "PASS" and "(JPEG records of quality 95) reads" in result.summary
    assert "images/s decoded in the loader (workers=0" in result.summary and set(result.details["by_decoder"]) == {
        "loader"}
    # with GPUs (faked: no GPU here), a JPEG store is also read with data.decode=gpu, on the first tower's GPU
    measured = []
    monkeypatch.setattr(preflight, "read_rate", lambda split, box, decode_on: measured.append(
        (split.records.spec["format"], decode_on)) or 100.0 * (1 + (decode_on is not None)))
    for store, expected in ((demo_jpeg_store, {"loader": 100.0, "gpu": 200.0}), (demo_store, {"loader": 100.0})):
        box = preflight.Box(["cpu", "cpu"], 4, 1, 1, store, 0, False, Path("."))
        box.gpus = [torch.device("cuda:0")]
        box.devices = [torch.device("cuda:0"), torch.device("cuda:1")]
        assert preflight.store_read_rates(box) == expected and preflight.store_read_rate(box) == max(expected.values())
    assert measured == [("jpeg", None), ("jpeg", torch.device("cuda:0")), ("raw", None)]
