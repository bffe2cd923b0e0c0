"""``vprompt segment`` end to end through the real CLI, and its prompt syntax."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vprompt.cli.segment_args import objects_from_cli, parse_point, parse_scribble
from vprompt.errors import DatasetError, PromptError

TINY = ("--model", "sam:tiny", "--weights", "none", "--device", "cpu")


def test_prompt_syntax() -> None:
    assert parse_point("3,4").positive
    assert not parse_point("3,4,0").positive
    with pytest.raises(PromptError, match="1 \\(object\\) or 0"):
        parse_point("3,4,2")
    with pytest.raises(PromptError, match="expected 2 or 3 numbers"):
        parse_point("3")
    scribble = parse_scribble("1,1;5,5;9,1:0")
    assert not scribble.positive
    assert len(scribble.points) == 3
    size = (100, 80)
    objs = objects_from_cli(
        points=["10,10", "20,20,0"],
        boxes=["0,0,50,50"],
        scribbles=[],
        mask=None,
        objects=[],
        image_size=size,
    )
    assert len(objs) == 1
    assert len(objs[0].points) == 2
    assert objs[0].box is not None
    two_boxes = objects_from_cli(
        points=[],
        boxes=["0,0,5,5", "6,6,9,9"],
        scribbles=[],
        mask=None,
        objects=[],
        image_size=size,
    )
    assert [o.box.x0 for o in two_boxes] == [0, 6]  # type: ignore[union-attr]
    with pytest.raises(PromptError, match="ambiguous"):
        objects_from_cli(
            points=["1,1"],
            boxes=["0,0,5,5", "6,6,9,9"],
            scribbles=[],
            mask=None,
            objects=[],
            image_size=size,
        )
    grouped = objects_from_cli(
        points=[],
        boxes=[],
        scribbles=[],
        mask=None,
        image_size=size,
        objects=["point=5,5|point=9,9,0|box=1,1,20,20", "scribble=1,1;30,30"],
    )
    assert len(grouped) == 2
    assert len(grouped[0].points) == 2
    assert len(grouped[1].points) >= 2  # the stroke became points
    with pytest.raises(PromptError, match="unknown item"):
        objects_from_cli(
            points=[], boxes=[], scribbles=[], mask=None, objects=["circle=1,2"], image_size=size
        )
    with pytest.raises(PromptError, match="no prompt"):
        objects_from_cli(points=[], boxes=[], scribbles=[], mask=None, objects=[], image_size=size)


def test_segment_cli_writes_masks_overlay_and_coco(run_cli, photos_dir: Path, tmp_path: Path):
    image = photos_dir / "chelsea.png"  # 451 x 300
    out = tmp_path / "seg"
    res = run_cli(
        "segment",
        image,
        *TINY,
        "--point",
        "200,150",
        "--box",
        "10,10,300,250",
        "--object",
        "point=400,100|point=420,120,0",
        "--out",
        out,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["model"] == "sam:tiny"
    assert len(summary["objects"]) == 2
    assert summary["objects"][0]["prompt"]["box"] == [10, 10, 300, 250]
    with Image.open(out / "mask_000.png") as m:
        assert m.size == (451, 300)
        values = set(np.unique(np.asarray(m)).tolist())
    assert values <= {0, 255}
    assert (out / "overlay.png").is_file()
    assert (out / "labels.png").is_file()
    coco = json.loads((out / "annotations.json").read_text())
    assert len(coco["annotations"]) == 2
    area = int((np.asarray(Image.open(out / "mask_000.png")) > 0).sum())
    assert coco["annotations"][0]["area"] == area == summary["objects"][0]["area"]
    logits = np.load(out / "logits.npy", allow_pickle=False)
    assert logits.shape == (2, 64, 64)

    # Refinement: feed the logits back with one more click.
    res2 = run_cli(
        "segment",
        image,
        *TINY,
        "--object",
        "point=200,150|point=100,100,0|box=10,10,300,250",
        "--object",
        "point=400,100|point=420,120,0",
        "--prev-logits",
        out / "logits.npy",
        "--out",
        tmp_path / "seg2",
        "--format",
        "polygon",
    )
    assert res2.returncode == 0, res2.stderr
    assert "wrote 2 mask(s)" in res2.stdout
    ann = json.loads((tmp_path / "seg2" / "annotations.json").read_text())["annotations"]
    assert all(isinstance(a["segmentation"], list) for a in ann)


def test_segment_cli_bad_input_is_one_clear_line(run_cli, photos_dir: Path, tmp_path: Path):
    image = photos_dir / "chelsea.png"
    res = run_cli("segment", image, *TINY, "--point", "900,10", "--out", tmp_path / "o")
    assert res.returncode == 1
    assert "outside the image" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
    res = run_cli("segment", image, *TINY, "--box", "50,50,10,10", "--out", tmp_path / "o")
    assert res.returncode == 1
    assert "inverted" in res.stderr
    res = run_cli("segment", image, *TINY, "--point", "nan,3", "--out", tmp_path / "o")
    assert res.returncode == 1
    assert "finite" in res.stderr
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"hello")
    res = run_cli("segment", bad, *TINY, "--point", "1,1", "--out", tmp_path / "o")
    assert res.returncode == 1
    assert "not a recognised image" in res.stderr


def test_segment_refuses_degenerate_images_and_logits_files_in_one_line(
    run_cli, photos_dir: Path, tmp_path: Path
):
    """A 5000 x 1 strip has no short side left in SAM's frame; --prev-logits must be one
    .npy array whose header matches the file (a .npz or a header claiming 10^12 values is
    refused before anything is read)."""
    strip = tmp_path / "strip.png"
    Image.new("RGB", (5000, 1), (120, 40, 20)).save(strip)
    image = photos_dir / "chelsea.png"
    np.savez(tmp_path / "logits.npz", logits=np.zeros((1, 64, 64), np.float32))
    huge = tmp_path / "huge.npy"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1, 10**6, 10**6)}
    )
    huge.write_bytes(header.getvalue() + bytes(64))
    cases = [
        ((strip, "--point", "10,0"), "image of 5000 x 1 pixels is too elongated"),
        ((image, "--point", "9,9", "--prev-logits", tmp_path / "logits.npz"), "a .npz archive"),
        ((image, "--point", "9,9", "--prev-logits", huge), "claims shape (1, 1000000, 1000000)"),
    ]
    for args, message in cases:
        res = run_cli("segment", *args, *TINY, "--out", tmp_path / "o")
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert message in lines[0]
    assert not (tmp_path / "o").exists()


def _ref_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    yy, xx = np.mgrid[0:96, 0:128]
    disc = (xx - 40) ** 2 + (yy - 50) ** 2 < 20**2
    photo = np.full((96, 128, 3), 40, np.uint8)
    photo[disc] = (230, 200, 30)
    Image.fromarray(photo).save(tmp_path / "ref.png")
    Image.fromarray((disc * 255).astype(np.uint8)).save(tmp_path / "ref_mask.png")
    Image.fromarray(photo[:, ::-1].copy()).save(tmp_path / "target.png")
    return tmp_path / "ref.png", tmp_path / "ref_mask.png", tmp_path / "target.png"


@pytest.mark.parametrize(
    ("method", "model"),
    [("persam", "sam:tiny"), ("persam-f", "sam:tiny-sam2"), ("seggpt", "seggpt:tiny")],
)
def test_personalize_cli(run_cli, tmp_path: Path, method: str, model: str) -> None:
    ref, ref_mask, target = _ref_pair(tmp_path)
    out = tmp_path / "out"
    res = run_cli(
        "personalize",
        target,
        target,
        "--ref",
        ref,
        "--ref-mask",
        ref_mask,
        "--method",
        method,
        "--model",
        model,
        "--weights",
        "none",
        "--device",
        "cpu",
        "--out",
        out,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["method"] for r in rows] == [method, method]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "target",
        "target-2",
    ]
    with Image.open(out / "target" / "mask_000.png") as m:
        assert m.size == (128, 96)
    assert (out / "target-2" / "annotations.json").is_file()


def test_personalize_cli_errors(run_cli, tmp_path: Path) -> None:
    ref, ref_mask, target = _ref_pair(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    tiny = ("--model", "sam:tiny", "--weights", "none", "--device", "cpu", "--out", tmp_path / "o")
    res = run_cli("personalize", target, "--ref", ref, "--ref-mask", tmp_path / "small.png", *tiny)
    assert res.returncode == 1
    assert "does not match the image" in res.stderr
    res = run_cli("personalize", target, "--ref", ref, "--ref", ref, "--ref-mask", ref_mask, *tiny)
    assert res.returncode == 1
    assert "one --ref-mask per --ref" in res.stderr
    res = run_cli(
        "personalize", target, "--ref", ref, "--ref-mask", ref_mask, "--method", "seggpt", *tiny
    )
    assert res.returncode == 1
    assert "needs a seggpt:* model" in res.stderr


def test_segment_all_cli(run_cli, photos_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    res = run_cli(
        "segment-all",
        photos_dir / "coffee.png",
        *TINY,
        "--points-per-side",
        "4",
        "--pred-iou-thresh",
        "0",
        "--stability-thresh",
        "0",
        "--crop-layers",
        "1",
        "--min-region-area",
        "20",
        "--out",
        out,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["config"]["points_per_side"] == 4
    assert summary["config"]["crop_n_layers"] == 1
    n = len(summary["objects"])
    assert n >= 1
    assert len(list(out.glob("mask_*.png"))) == n
    coco = json.loads((out / "annotations.json").read_text())
    assert [a["area"] for a in coco["annotations"]] == [o["area"] for o in summary["objects"]]
    bad = tmp_path / "bad"
    res = run_cli(
        "segment-all", photos_dir / "coffee.png", *TINY, "--pred-iou-thresh", "2", "--out", bad
    )
    assert res.returncode == 1
    assert "pred_iou_thresh" in res.stderr
    assert not bad.exists()


def test_models_lists_the_sam_family_with_readable_columns(run_cli) -> None:
    res = run_cli("models", "--family", "sam")
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split() == ["NAME", "FAMILY", "TAGS"]  # short family names keep a gap
    assert any(r.startswith("sam:vit-base") and "facebook/sam-vit-base" in r for r in rows)
    assert any(r.startswith("sam:tiny ") for r in rows)


def _perseg(root: Path) -> Path:
    """Two concepts (a disc and a square), three images each, in the PerSeg layout."""
    yy, xx = np.mgrid[0:64, 0:80]
    for name, shape in (
        ("disc", lambda cx: (xx - cx) ** 2 + (yy - 32) ** 2 < 12**2),
        ("square", lambda cx: (abs(xx - cx) < 10) & (abs(yy - 30) < 10)),
    ):
        (root / name / "images").mkdir(parents=True)
        (root / name / "masks").mkdir()
        for i, cx in enumerate((20, 40, 60)):
            m = shape(cx)
            photo = np.full((64, 80, 3), 50, np.uint8)
            photo[m] = (220, 60, 30)
            Image.fromarray(photo).save(root / name / "images" / f"{i:02d}.png")
            Image.fromarray((m * 255).astype(np.uint8)).save(root / name / "masks" / f"{i:02d}.png")
    return root


def test_eval_oneshot_cli(run_cli, tmp_path: Path) -> None:
    data = _perseg(tmp_path / "perseg")
    res = run_cli(
        "eval-oneshot",
        "--data",
        data,
        "--method",
        "persam",
        "--model",
        "sam:tiny",
        "--weights",
        "none",
        "--device",
        "cpu",
        "--out",
        tmp_path / "r",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert set(report["per_concept"]) == {"disc", "square"}
    assert [len(v) for v in report["per_target"].values()] == [2, 2]  # the first is the ref
    assert 0 <= report["miou"] <= 1
    assert (tmp_path / "r" / "report.json").is_file()


def test_oneshot_protocol_scores_targets_against_their_masks(tmp_path: Path) -> None:
    from vprompt.segment.oneshot_eval import evaluate_oneshot, load_concepts

    data = _perseg(tmp_path / "perseg")
    concepts = load_concepts(data)
    assert [c.name for c in concepts] == ["disc", "square"]
    assert concepts[0].images[0].name == "00.png"  # the reference

    def oracle(ref, mask, targets):  # the reference mask itself: right only where it overlaps
        return [mask for _ in targets]

    report = evaluate_oneshot(concepts, oracle, progress=False)
    disc = report.per_target["disc"]
    assert disc[0] > disc[1]  # the nearer target overlaps the reference disc more
    assert report.miou == pytest.approx(np.mean([np.mean(v) for v in report.per_target.values()]))
    assert load_concepts(data / "disc")[0].name == "disc"
    with pytest.raises(DatasetError, match="images/ and masks/"):
        load_concepts(tmp_path)


def test_segment_never_writes_over_another_runs_outputs(run_cli, photos_dir: Path, tmp_path):
    image, out = photos_dir / "chelsea.png", tmp_path / "o"
    first = run_cli("segment", image, *TINY, "--point", "20,20", "--out", out)
    assert first.returncode == 0, first.stderr
    mask = (out / "mask_000.png").read_bytes()
    other = run_cli("segment", image, *TINY, "--point", "60,40", "--out", out)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines() == [
        f"vprompt: error: output folder {out} holds the outputs of another `vprompt segment` "
        "run (other inputs or settings); choose an empty or new --out folder, or pass "
        "--overwrite to write over them"
    ]
    assert (out / "mask_000.png").read_bytes() == mask
    again = run_cli("segment", image, *TINY, "--point", "60,40", "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr


def test_the_overlay_marks_the_clicks_and_the_box(run_cli, photos_dir: Path, tmp_path: Path):
    from vprompt.segment.outputs import PALETTE

    out = tmp_path / "marks"
    res = run_cli("segment", photos_dir / "chelsea.png", *TINY, "--point", "200,150",
                  "--box", "10,10,300,250", "--object", "point=400,100|point=420,120,0",
                  "--out", out)  # fmt: skip
    assert res.returncode == 0, res.stderr
    with Image.open(out / "overlay.png") as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert tuple(pixels[150, 200]) == (40, 220, 40)  # the positive click, green
    assert tuple(pixels[120, 420]) == (230, 30, 30)  # the negative click, red
    assert tuple(pixels[10, 150]) == PALETTE[0]  # the first object's box edge, its colour


def test_segment_all_says_which_threshold_removed_every_mask(run_cli, photos_dir, tmp_path):
    out = tmp_path / "none"
    res = run_cli("segment-all", photos_dir / "coffee.png", *TINY, "--points-per-side", "4",
                  "--pred-iou-thresh", "1.0", "--out", out)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert ("vprompt: warning: no masks: none of the 48 candidates had a predicted IoU above "
            "1.0 (lower --pred-iou-thresh)") in res.stderr  # fmt: skip
    assert "wrote no masks" in res.stdout
    assert not (out / "overlay.png").exists()  # and does not announce one
