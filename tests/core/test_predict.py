"""`deeplab-batch predict` on local files, good and bad."""

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main as cli_main
from pipeline.model import deeplab_v1
from pipeline.weights import ModelRecord, save_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    model = deeplab_v1("largefov", num_classes=3, width=0.0625)
    record = ModelRecord(variant="largefov", num_classes=3, class_names=("background", "a", "b"),
                         palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)), width=0.0625, source="test")
    save_checkpoint(path, model=model, record=record)
    return path


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 16), dtype=np.uint8)).save(folder / "gray.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


@pytest.mark.parametrize("crf", ["--crf", "--no-crf"])
def test_predict_writes_masks_and_overlays_and_reports_bad_files(tiny_checkpoint, images, tmp_path, capsys, crf):
    out = tmp_path / "out"
    code = cli_main(["predict", str(images), "--out", str(out), "--weights", str(tiny_checkpoint), crf])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.jpg" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.jpg", "gray.png", "gray_overlay.jpg"]
    with Image.open(out / "a.png") as mask:
        assert mask.mode == "P" and mask.size == (50, 37)
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2}
        assert mask.getpalette()[3:6] == [255, 0, 0]
    with Image.open(out / "gray_overlay.jpg") as overlay:
        assert overlay.size == (16, 20)


def test_predict_all_good_exits_zero(tiny_checkpoint, images, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["predict", str(images / "a.jpg"), "--out", str(out), "--weights", str(tiny_checkpoint), "--no-crf"]) == 0
    assert (out / "a.png").is_file()


def test_predict_missing_weights_says_what_to_do(images, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        cli_main(["predict", str(images), "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "missing.safetensors")])


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli_main(["--help"]) == 0
    assert "segment" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["frobnicate"])
