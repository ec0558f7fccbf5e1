"""`deeplab-batch evaluate` end to end on a tiny VOC folder, on a real local Ray instance."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import evaluate as evaluate_job
from pipeline.data.voc import VOCDataset, read_label_png, write_label_png
from pipeline.evaluation.metrics import ConfusionMatrix
from pipeline.evaluation.stages import ScoreStage
from pipeline.stages.crf import logits_of

from .conftest import NUM_VAL

pytestmark = pytest.mark.usefixtures("ray_local")


def run_evaluate(*args: str) -> int:
    return evaluate_job.main([*map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def model_run(tiny_voc, tiny_model, tmp_path_factory, ray_local) -> Path:
    out = tmp_path_factory.mktemp("eval")
    rc = run_evaluate("--data", tiny_voc, "--weights", tiny_model, "--out", out, "--samples", 2, "--crf-actors", 1)
    assert rc == 0
    return out


def test_model_run_scores_network_and_crf(model_run, tiny_voc, tiny_model):
    report = json.loads((model_run / "metrics.json").read_text())
    assert report["num_images"] == NUM_VAL
    assert set(report["methods"]) == {"network", "crf"}

    # The same scores computed here without Ray: the aggregation over Ray must agree.
    from pipeline.evaluation.runner import model_rows
    from pipeline.stages.decode import pixels_of
    from pipeline.stages.network import NetworkStage

    dataset = VOCDataset(tiny_voc, split="val", num_classes=5)
    network = NetworkStage(weights=str(tiny_model), device="cpu")  # segment's network stage
    rows = model_rows(dataset, network, range(NUM_VAL)).to_pylist()
    scorer = ScoreStage(dataset=dataset, num_classes=5, crf_params="largefov")
    expected = {"network": ConfusionMatrix(5), "crf": ConfusionMatrix(5)}
    labels = [dataset.read_label(row["image_id"]) for row in rows]
    for row, label in zip(rows, labels):
        net, crf = scorer.predict(pixels_of(row), logits_of(row))
        expected["network"].update(net, label)
        expected["crf"].update(crf, label)
    void_free = sum(int((label != 255).sum()) for label in labels)
    for method, cm in expected.items():
        got = np.array(report["methods"][method]["confusion_matrix"])
        assert got.sum() == void_free
        np.testing.assert_array_equal(got.sum(axis=1), cm.matrix.sum(axis=1))  # ground truth: exact
        # predictions: equal up to fp16 score differences between batch compositions
        assert np.abs(got - cm.matrix).sum() <= 0.01 * void_free, method
    # The CRF's effect is reported both ways: whole image and near boundaries.
    for method in ("network", "crf"):
        entry = report["methods"][method]
        assert 0 <= entry["miou"] <= 1 and 0 <= entry["pixel_accuracy"] <= 1
        assert len(entry["trimap"]["pixel_accuracy"]) == 40 and len(entry["trimap"]["miou"]) == 40
        assert entry["trimap"]["pixels"] == sorted(entry["trimap"]["pixels"])  # nested bands
    assert report["methods"]["network"]["confusion_matrix"] != report["methods"]["crf"]["confusion_matrix"]
    assert report["meta"]["crf_params"]["sigma_alpha"] == 121.0  # the largefov preset

    table = pq.read_table(model_run / "metrics.parquet").to_pylist()
    trimap = [r for r in table if r["metric"] == "trimap_miou" and r["method"] == "crf"]
    assert sorted(r["band_width"] for r in trimap) == list(range(1, 41))
    miou = {r["method"]: r["value"] for r in table if r["metric"] == "miou"}
    assert miou == pytest.approx({m: report["methods"][m]["miou"] for m in ("network", "crf")})
    images = pq.read_table(model_run / "images.parquet").to_pylist()
    assert len(images) == 2 * NUM_VAL
    for name in ("trimap_accuracy.png", "trimap_miou.png", "class_iou.png"):
        with Image.open(model_run / name) as im:
            assert im.width > 100


def test_predictions_perfect_and_segment_layout(tiny_voc, tiny_model, tmp_path, capsys):
    from pipeline.outputs import OutputLayout, metadata_for
    from pipeline.weights import read_record

    dataset = VOCDataset(tiny_voc, split="val")
    masks = tmp_path / "run" / "masks"
    masks.mkdir(parents=True)
    for image_id in dataset.ids:
        label = read_label_png(dataset.label_path(image_id))
        # segment's layout: masks/<slug>-<16 hex>.png; void pixels predicted as background
        write_label_png(masks / f"{image_id}-0123456789abcdef.png", np.where(label == 255, 0, label))
    out = tmp_path / "out"
    # Not a segment output (no model record) and no --classes / --weights: the class names are unknown.
    assert run_evaluate("--data", tiny_voc, "--predictions", tmp_path / "run", "--out", out) == 2
    assert "pass --classes voc|FILE or --weights CKPT" in capsys.readouterr().err

    # segment stores its model record in the segments' Parquet metadata: no flag needed.
    names = ("bg", "one", "two", "three", "four")
    record = read_record(tiny_model).replace(class_names=names)
    OutputLayout(str(tmp_path / "run")).write_segments(
        [{"image_id": "x", "status": "ok"}], metadata=metadata_for(config={}, model=record.to_dict())
    )
    assert run_evaluate("--data", tiny_voc, "--predictions", tmp_path / "run", "--out", out) == 0
    report = json.loads((out / "metrics.json").read_text())
    entry = report["methods"]["predictions"]
    assert entry["miou"] == 1.0 and entry["pixel_accuracy"] == 1.0
    assert all(v == 1.0 for v in entry["trimap"]["pixel_accuracy"])
    assert tuple(report["class_names"]) == names
    assert report["meta"]["classes_from"].startswith(str(tmp_path / "run" / "segments"))
    assert "predictions" in capsys.readouterr().out


def test_predictions_missing_mask_is_named(tiny_voc, tiny_model, tmp_path, capsys):
    (tmp_path / "preds").mkdir()
    args = ("--data", tiny_voc, "--predictions", tmp_path / "preds", "--weights", tiny_model, "--out", tmp_path / "o")
    assert run_evaluate(*args) == 2
    assert "no predicted mask for 4 of 4 split ids" in capsys.readouterr().err


def test_missing_file_in_split_is_named(voc_copy, tiny_model, tmp_path, capsys):
    victim = sorted((voc_copy / "JPEGImages").glob("*.jpg"))[1]
    victim.unlink()
    assert run_evaluate("--data", voc_copy, "--weights", tiny_model, "--out", tmp_path / "o") == 2
    assert str(victim) in capsys.readouterr().err


def test_label_size_mismatch_is_named(voc_copy, tiny_model, tmp_path, capsys):
    victim = sorted((voc_copy / "SegmentationClass").glob("*.png"))[2]
    label = read_label_png(victim)
    write_label_png(victim, label[:-3, :])
    assert run_evaluate("--data", voc_copy, "--weights", tiny_model, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "label is" in err


def test_class_id_beyond_num_classes_is_named(voc_copy, tiny_voc, tmp_path, capsys):
    victim = min((voc_copy / "SegmentationClass").glob("*.png"))
    label = read_label_png(victim).copy()
    label[0, 0] = 23  # beyond VOC's 21 classes
    write_label_png(victim, label)
    # predictions mode (no model): the check is the dataset's, whichever mode runs
    masks = tmp_path / "preds"
    shutil.copytree(tiny_voc / "SegmentationClass", masks)
    assert run_evaluate("--data", voc_copy, "--predictions", masks, "--classes", "voc", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "[23]" in err


def test_prediction_size_mismatch_is_named(tiny_voc, tiny_model, tmp_path, capsys):
    masks = tmp_path / "preds"
    shutil.copytree(tiny_voc / "SegmentationClass", masks)
    victim = sorted(masks.glob("*.png"))[3]
    write_label_png(victim, np.zeros((5, 7), np.uint8))
    assert run_evaluate("--data", tiny_voc, "--predictions", masks, "--weights", tiny_model, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "7x5" in err


# -- runs that used to hang ----------------------------------------------------------


def test_device_cuda_without_a_gpu_in_the_cluster_is_refused(tiny_voc, tiny_model, tmp_path, capsys):
    args = ("--data", tiny_voc, "--weights", tiny_model, "--device", "cuda", "--out", tmp_path / "o")
    assert run_evaluate(*args) == 2
    err = capsys.readouterr().err  # segment's planner refuses it, naming the setting and the flag
    assert "network.device: 'cuda' was asked for but the cluster has no GPU" in err
    assert "--device sets network.device" in err


def test_one_free_cpu_is_enough(ray_local, tiny_voc, tiny_model, tmp_path):
    """With one CPU free the network actor, a CRF actor and a read task share it (fractional CPUs)."""

    @ray_local.remote(num_cpus=1)
    class Hold:
        def ready(self) -> bool:
            return True

    hold = Hold.remote()
    try:
        assert ray_local.get(hold.ready.remote())
        deadline = time.monotonic() + 30  # earlier tests' actors may still be releasing their CPUs
        while ray_local.available_resources().get("CPU", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        out = tmp_path / "o"
        args = ("--data", tiny_voc, "--weights", tiny_model, "--limit", 1, "--samples", 0, "--out", out)
        assert run_evaluate(*args, "--stall-timeout", 60) == 0
    finally:
        ray_local.kill(hold)
    plan = json.loads((out / "metrics.json").read_text())["meta"]["plan"]  # pipeline.resources.plan_resources
    assert plan["network_num_cpus"] + plan["crf_num_cpus"] + plan["decode_num_cpus"] <= 1.0
    assert plan["network_num_cpus"] > 0 and plan["network_pool"] == plan["crf_pool"] == 1


def test_a_stalled_run_fails_with_a_clear_error(ray_local):
    """evaluate's stall guard is segment's (pipeline.execution)."""
    from ray.data import DataContext

    from pipeline.execution import Stalled, configure_context, stall_guarded

    class Passthrough:
        def __call__(self, batch):
            return batch

    ctx = DataContext.get_current()
    saved = ctx.execution_no_progress_timeout_s
    try:
        configure_context(no_progress_timeout_s=2)
        # An actor asking for a GPU the cluster does not have can never start.
        ds = ray_local.data.from_items([{"i": 0}]).map_batches(
            Passthrough, compute=ray_local.data.ActorPoolStrategy(size=1), num_gpus=1, batch_size=1
        )
        with pytest.raises(Stalled, match="the evaluation made no progress for 2 s"):
            list(stall_guarded(ds.iter_rows(), timeout_s=2, what="the evaluation"))
    finally:
        ctx.execution_no_progress_timeout_s = saved


@pytest.mark.parametrize("job", ["evaluate", "tune-crf"])
def test_default_demo_model_on_other_classes_says_so(job, voc_copy, tmp_path, capsys):
    from jobs import tune_crf as tune_job

    victim = min((voc_copy / "SegmentationClass").glob("*.png"))
    label = read_label_png(victim).copy()
    label[0, 0] = 7  # a class the 5-class demo model does not have
    write_label_png(victim, label)
    args = ["--data", voc_copy, "--out", tmp_path / "o", "--no-progress"]  # no --weights: the demo model
    main = evaluate_job.main if job == "evaluate" else tune_job.main
    assert main([*map(str, args), *(["--images", "1"] if job == "tune-crf" else ["--limit", "1"])]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "[7]" in err
    assert "the default model is the 5-class demo" in err and "pass --weights" in err


# -- the HTML report in a real browser ------------------------------------------------

CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "img-check";
  out.textContent = JSON.stringify(Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]));
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def image_states(html_path: Path, browser: str) -> list[list]:
    """Load the page in headless Chromium and read back every <img>'s (alt, complete, naturalWidth)."""
    probe = html_path.with_name("probe-" + html_path.name)
    probe.write_text(html_path.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = re.search(r'<pre id="img-check">(.*?)</pre>', dom, re.DOTALL)
    assert found, "the check script did not run"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_report_images_load_in_headless_chromium(model_run, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary (install it: apt-get install -y chromium)")
    page = (model_run / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    shutil.copy(model_run / "report.html", tmp_path / "report.html")
    states = image_states(tmp_path / "report.html", browser)
    assert len(states) == 3 + 2 * 4  # 3 plots; 2 samples x (image, ground truth, network, crf)
    assert all(complete and width > 0 for _, complete, width in states), states

    # The check can fail: a corrupted inline PNG reads as naturalWidth 0.
    first = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    broken = base64.b64encode(b"not a png").decode()
    (tmp_path / "broken.html").write_text(page.replace(first, broken, 1), encoding="utf-8")
    widths = [w for _, _, w in image_states(tmp_path / "broken.html", browser)]
    assert widths.count(0) == 1
