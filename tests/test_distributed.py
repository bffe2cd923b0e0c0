"""Data-parallel training under torchrun: two CPU ranks (gloo) learn the prompt one process
learns with the same global batch, write from rank 0 only, and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    ".vprompt-out.json", "checkpoint.json", "checkpoint.safetensors", "config.json",
    "learning_curves.png", "metrics.jsonl", "prompt.png", "prompt.safetensors",
    "prompted_examples.png", "test_metrics.json",
}  # fmt: skip

# Trains coop on clip:tiny through fit() (on cached features, augmented views); stops after
# epoch STOP (-1: never). Ranks other than 0 fail on any write into the run folder.
WORKER = textwrap.dedent(
    """
    import contextlib
    import sys

    from vprompt.backbones import load_backbone
    from vprompt.data.feature_cache import FeatureCache
    from vprompt.data.sources import load_data
    from vprompt.engine import distributed
    from vprompt.engine.experiment import Experiment
    from vprompt.engine.fit import fit
    from vprompt.engine.runtime import seed_everything
    from vprompt.utils.io import before_first_write

    data, out, cache, stop = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


    def refuse():
        raise AssertionError(f"rank {distributed.rank()} wrote into the run folder")


    def stop_after(event):
        if event.kind == "epoch" and event.epoch == stop:
            raise KeyboardInterrupt


    with distributed.process_group("cpu") as device:
        splits = load_data(f"folder:{data}")
        backbone = load_backbone("clip:tiny", "none", device=device)
        seed_everything(0)
        settings = ("optim.epochs=2", "optim.batch_size=4", "n_ctx=4", "feature_views=2")
        method = Experiment("coop", None, settings).build(backbone, splits.classnames)
        try:
            main = distributed.is_main()
            with contextlib.nullcontext() if main else before_first_write(out, refuse):
                fit(method, splits.train, val=splits.val, out_dir=out, device=device,
                    progress=False, callbacks=[stop_after], feature_cache=FeatureCache(cache))
        except KeyboardInterrupt:
            sys.exit(3)
    """
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    full = dict(os.environ)
    full.update(
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        VPROMPT_CACHE=str(tmp_path_factory.mktemp("vprompt-cache")),
    )
    return full


def _python(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=240,
    )


def _torchrun(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    return _python(*launcher, *args, env=env)


def _assert_same_pack(one: Path, two: Path) -> None:
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


def test_torchrun_visual_prompt_matches_one_process_and_writes_once(
    tiny_folder: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    # 12 training images in global batches of 5: the last batch (2) splits 1 + 1.
    args = [
        "-m", "vprompt", "train", "--method", "visual-prompt", "--model", "torchvision:tiny",
        "--weights", "none", "--data", f"folder:{tiny_folder}", "--set", "optim.epochs=2",
        "--set", "optim.batch_size=5", "--set", "mapping=linear", "--set", "inner_size=48",
        "--json",
    ]  # fmt: skip
    one = _python(*args, "--out", tmp_path / "one", env=env)
    assert one.returncode == 0, one.stderr
    two = _torchrun(*args, "--out", tmp_path / "two", env=env)
    assert two.returncode == 0, two.stderr
    _assert_same_pack(
        tmp_path / "one" / "prompt.safetensors", tmp_path / "two" / "prompt.safetensors"
    )
    # Rank 0 alone reports: one JSON line, as one process prints.
    reports = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1
    assert json.loads(reports[0])["test_accuracy"] == json.loads(one.stdout)["test_accuracy"]
    # One set of run files, no leftovers of a second writer.
    assert {p.name for p in (tmp_path / "two").iterdir()} == EXPECTED
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)


def test_coop_data_parallel_resumes_and_matches_one_process(
    tiny_folder: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cache = tmp_path / "features"
    one = _python(worker, tiny_folder, tmp_path / "one", cache, -1, env=env)
    assert one.returncode == 0, one.stderr
    run = tmp_path / "two"
    stopped = _torchrun(worker, tiny_folder, run, cache, 0, env=env)
    assert stopped.returncode != 0  # both ranks stopped after epoch 0
    assert "wrote into the run folder" not in stopped.stderr, stopped.stderr
    progress = json.loads((run / "checkpoint.json").read_text())
    assert progress["epochs_done"] == 1
    assert not (run / "prompt.safetensors").exists()
    resumed = _torchrun(worker, tiny_folder, run, cache, -1, env=env)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_pack(tmp_path / "one" / "prompt.safetensors", run / "prompt.safetensors")
    assert _losses(run) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert json.loads((run / "checkpoint.json").read_text())["finished"]
