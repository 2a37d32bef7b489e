"""Evaluation (repro/evaluate.py): the batch is counted in images, and the host reads the device once per pass."""

from repro.config import build_model
from repro.data import Augment
from repro.evaluate import evaluate
from repro.measure import HostSyncs
from repro.store import PreparedStore


def test_a_ten_patch_batch_holds_the_configured_images_and_the_counts_stay_on_the_device(demo_store):
    store = PreparedStore(demo_store)
    split, stats = store.split("val"), store.stats()
    model = build_model({"num_classes": len(store.classes)})
    augment = Augment(stats["mean_image"], stats["eigvals"], stats["eigvecs"], devices=model.devices)
    seen = []
    model.towers[0].conv1.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    results, syncs = [], []
    for images_per_batch in (3, len(split)):
        seen.clear()
        with HostSyncs() as recorder:
            results.append(evaluate(model, augment, split, images_per_batch, ten_crop=True))
        syncs.append(recorder.count)
        full, rest = divmod(len(split), images_per_batch)
        assert seen == [10 * images_per_batch] * full + ([10 * rest] if rest else [])  # images x 10 views
    assert results[0] == results[1] and results[0]["images"] == len(split)
    assert syncs[0] == syncs[1]  # one read at the end, however many batches
