"""kNN and linear-probe evaluation (fcmae/eval/knn.py, finetune/knn.py, finetune/linprobe.py): the math, the commands,
bad input, and the same results on two processes as on one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fcmae.eval import knn as knn_core
from finetune import knn, linprobe

ARCH = ["--depths", "[1, 1, 1, 1]", "--dims", "[8, 16, 16, 16]"]
RUN = ["--device", "cpu", "--num_workers", "0", "--input_size", "32", "--crop_pct", "1.0", "--batch_size", "4"]
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def make_folder(root: Path, train=COLOURS, val=COLOURS, per_class=(6, 3), seed=0) -> Path:
    """An image folder of noisy solid-colour images, one class per colour (the classes are easy to tell apart)."""
    gen = torch.Generator().manual_seed(seed)
    for split, classes, count in (("train", train, per_class[0]), ("val", val, per_class[1])):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = torch.tensor(COLOURS[name], dtype=torch.float32).view(3, 1, 1)
                pixels = (base + 40 * torch.randn(3, 40, 40, generator=gen)).clamp(0, 255).byte()
                Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(root / split / name / f"{i}.png")
    return root


def run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# ---------------------------------------------------------------- the classifier
def naive_knn(train, train_labels, test, num_classes, k, temperature):
    """Predicted class rankings, one test row at a time, written out plainly."""
    ranks = []
    for row in test:
        sims = [(float(row @ t), int(label)) for t, label in zip(train, train_labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, label in sims[:k]:
            votes[label] += float(torch.tensor(sim / temperature).exp())
        ranks.append(sorted((c for c in range(num_classes) if votes[c] > 0), key=lambda c: -votes[c]))
    return ranks


def test_knn_classify_matches_a_plain_implementation():
    gen = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(50, 6, generator=gen), dim=1)
    train_labels = torch.randint(0, 7, (50,), generator=gen)
    test = F.normalize(torch.randn(23, 6, generator=gen), dim=1)
    test_labels = torch.randint(0, 7, (23,), generator=gen)
    for k, temperature in ((20, 0.07), (3, 0.5), (100, 0.07)):
        ranks = naive_knn(train, train_labels, test, 7, k, temperature)
        want1 = sum(r[0] == int(y) for r, y in zip(ranks, test_labels))
        want5 = sum(int(y) in r[:5] for r, y in zip(ranks, test_labels))
        got = knn_core.knn_classify(train, train_labels, test, test_labels, 7, k, temperature, chunk=5)
        assert got == (want1, want5)
        assert 0 < want1 < want5 < 23  # the case is not trivial


def test_knn_of_identical_copies_is_perfect():
    feats = F.normalize(torch.randn(12, 4), dim=1)
    labels = torch.arange(12) % 3
    assert knn_core.knn_classify(feats, labels, feats, labels, 3, k=1) == (12, 12)


# ---------------------------------------------------------------- the commands
def test_knn_and_linprobe_commands(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    code, out, err = run_main(knn.main, ["none", "--data_path", str(data), *ARCH, *RUN], capsys)
    assert code == 0, err
    assert "3 classes, 18 train / 9 val images at 32x32" in out
    top1 = float(out.split("top-1 ")[1].split("%")[0])
    assert top1 >= 80  # colours are easy even for random features; chance is 33%
    assert "top-5" not in out  # 3 classes: every image's class is among the best 5

    code, out, err = run_main(linprobe.main, ["none", "--data_path", str(data), *ARCH, *RUN, "--epochs", "20",
                                              "--warmup_epochs", "2", "--head_batch_size", "8", "--blr", "1.0"],
                              capsys)
    assert code == 0, err
    assert "epoch 20/20" in out
    assert float(out.split("linprobe  top-1 ")[1].split("%")[0]) >= 80
    assert "(9 val images at 32x32, crop_pct 1.0, checkpoint none)" in out  # what was evaluated, and how
    assert "top-5" not in out
    assert "cached 16-d features of the 18 training and 9 validation images; training the head" in out  # one process


def test_top5_is_reported_only_with_more_than_5_classes():
    """kNN and the linear probe (fine-tuning's evaluate: tests/finetune/test_finetune.py)."""
    for classes, reported in ((5, False), (6, True)):
        feats = F.normalize(torch.randn(4 * classes, 8, generator=torch.Generator().manual_seed(classes)), dim=1)
        labels = torch.arange(4 * classes) % classes
        loader = [(feats, labels)]
        result = knn_core.knn_evaluate(lambda x: x, loader, loader, torch.device("cpu"), classes, k=3)
        assert ("top5" in result) == reported and result["top1"] == 100.0  # each image is its own neighbour
        probe = linprobe.evaluate_probe(linprobe.LinearProbe(8, classes), feats, labels)
        assert ("top5" in probe) == reported and probe["count"] == 4 * classes


def test_an_unknown_flag_names_the_closest_one(capsys):
    code, _, err = run_main(knn.main, ["none", "--demo", "--kk", "5"], capsys)
    assert code == 2 and "unrecognized argument --kk; did you mean --k?" in err, err


def test_linear_probe_reads_the_loss_on_the_host_once_per_epoch(monkeypatch):
    # A host read of a GPU tensor waits for the device: once per epoch for the log, not once per step.
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real_float(t))
    feats, labels = torch.randn(24, 8), torch.arange(24) % 3
    logged = []
    linprobe.train_probe(feats, labels, 3, epochs=2, batch_size=4, warmup_epochs=1,
                         log=lambda epoch, loss, lr: logged.append(loss))
    assert len(logged) == 2 and all(loss > 0 for loss in logged)
    assert len(reads) == 2  # 6 steps per epoch


def test_linear_probe_head_is_batchnorm_without_affine_then_linear():
    head = linprobe.LinearProbe(16, 5)
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    assert isinstance(head[1], torch.nn.Linear) and float(head[1].bias.detach().abs().sum()) == 0


def test_checkpoint_weights_are_used(tmp_path, capsys, monkeypatch):
    """load_backbone reads a converted weights file (the saved model's features, not random ones); the kNN
    command then runs on it."""
    from finetune import model as finetune_model
    from finetune.model import load_backbone

    data = make_folder(tmp_path / "data", per_class=(2, 1))
    model = load_backbone(None, "atto", [1, 1, 1, 1], [8, 16, 16, 16], seed=5)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    conversions = []
    real_convert = finetune_model.convert
    monkeypatch.setattr(finetune_model, "convert", lambda *a, **k: conversions.append(1) or real_convert(*a, **k))
    again = load_backbone(str(path))
    assert again.arch == ((1, 1, 1, 1), (8, 16, 16, 16))
    assert len(conversions) == 1  # the file's architecture and its weights come from one conversion
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.forward_features(x), model.forward_features(x))
    code, out, err = run_main(knn.main, [str(path), "--data_path", str(data), *RUN], capsys)
    assert code == 0 and "top-1" in out, err


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("case, message", [
    ("no_val", "has no val/ folder: fcmae-knn needs"),  # the command that runs, not fine-tuning
    ("mismatch", "the classes of train/ and val/ differ"),
    ("empty_class", "class folder(s) without images"),
    ("no_classes", "has no class sub-folders"),
    ("one_class", "need at least 2"),
    ("other_size", "size mismatch"),
    ("other_size", "but the model fcmae-knn evaluates is"),  # not "the model to fine-tune"
    ("missing_file", "checkpoint not found"),
    ("unreadable", "unreadable image"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, message):
    check_bad_input(tmp_path, capsys, case, message, knn.main)


@pytest.mark.parametrize("case, message", [("mismatch", "the classes of train/ and val/ differ"),
                                           ("no_val", "has no val/ folder: fcmae-linprobe needs"),
                                           ("other_size", "but the model fcmae-linprobe evaluates is"),
                                           ("unreadable", "unreadable image")])
def test_linprobe_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, message):
    check_bad_input(tmp_path, capsys, case, message, linprobe.main)


def check_bad_input(tmp_path, capsys, case, message, main):
    data, ckpt = tmp_path / "data", "none"
    extra = list(ARCH)
    if case == "no_val":
        make_folder(data, val={})
    elif case == "mismatch":
        make_folder(data, val={"blue": 0, "green": 0}, per_class=(1, 1))
    elif case == "empty_class":
        make_folder(data, per_class=(1, 1))
        (data / "val" / "violet").mkdir()
        (data / "train" / "violet").mkdir()
    elif case == "no_classes":
        (data / "train").mkdir(parents=True)
        (data / "val").mkdir()
    elif case == "one_class":
        make_folder(data, train={"red": 0}, val={"red": 0}, per_class=(1, 1))
    elif case == "other_size":
        make_folder(data, per_class=(1, 1))
        from finetune.model import load_backbone

        ckpt = str(tmp_path / "w.pth")
        torch.save(load_backbone(None, "atto", [1, 1, 1, 1], [8, 16, 16, 24]).state_dict(), ckpt)
        extra = ["--size", "atto", *ARCH]
    elif case == "missing_file":
        make_folder(data, per_class=(1, 1))
        ckpt = str(tmp_path / "nothing.pth")
    elif case == "unreadable":  # never replaced by another file in evaluation: an error naming it
        make_folder(data, per_class=(1, 1))
        good = (data / "val" / "red" / "0.png").read_bytes()
        (data / "val" / "red" / "1_truncated.png").write_bytes(good[: len(good) // 3])
        message = f"unreadable image {data / 'val' / 'red' / '1_truncated.png'}"
    code, out, err = run_main(main, [ckpt, "--data_path", str(data), *extra, *RUN], capsys)
    assert code == 2
    assert message in err and err.startswith(("fcmae-knn: error:", "fcmae-linprobe: error:"))
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_demo_and_data_path_are_exclusive(capsys):
    code, _, err = run_main(knn.main, ["none"], capsys)
    assert code == 2 and "exactly one of --data_path D" in err


# ---------------------------------------------------------------- two processes
def _two_ranks(rank, data, init_file, results):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        results[rank] = _evaluate(data)
    finally:
        dist.destroy_process_group()


def _evaluate(data):
    """kNN and linear-probe results of the tiny model on `data`, on however many processes are running."""
    args = knn.build_parser().parse_args(["none", "--data_path", str(data), *ARCH, *RUN])
    info, model, train_loader, val_loader, classes, _ = knn.prepare(args)
    encode, device = model.forward_features, info.device
    result = knn_core.knn_evaluate(encode, train_loader, val_loader, device, len(classes), k=5)
    feats, labels = knn_core.extract_features(encode, train_loader, device, normalize=False)
    val_feats, val_labels = knn_core.extract_features(encode, val_loader, device, normalize=False)
    bank = knn_core.gather_rows(feats)
    head = linprobe.train_probe(feats, labels, len(classes), epochs=3, batch_size=4, blr=0.5, warmup_epochs=1)
    probe = linprobe.evaluate_probe(head, val_feats, val_labels)
    return {"knn": result, "bank_rows": bank.shape[0], "probe_count": probe["count"],
            "weight": head[1].weight.detach().clone()}


@pytest.mark.slow
def test_two_processes_give_the_single_process_knn(tmp_path):
    import torch.multiprocessing as mp

    data = make_folder(tmp_path / "data", per_class=(5, 3))  # 15 train, 9 val: uneven shards
    single = _evaluate(data)
    results = mp.Manager().dict()
    # spawn, not fork: this process has already run autograd (here, and in earlier tests of the suite),
    # and a forked child cannot run backward after that.
    mp.start_processes(_two_ranks, args=(data, tmp_path / "init", results), nprocs=2, join=True,
                       start_method="spawn")
    for rank in (0, 1):
        got = results[rank]
        assert got["knn"] == single["knn"]  # the same neighbours: the whole training set is gathered
        assert got["bank_rows"] == 15 and got["probe_count"] == 9
    # DDP keeps the two heads identical (not the single-process head: other batches).
    torch.testing.assert_close(results[0]["weight"], results[1]["weight"])


@pytest.mark.slow
def test_python_m_entry_point(tmp_path):
    """`python -m finetune.linprobe` (which imports finetune.knn) runs as a command."""
    data = make_folder(tmp_path / "data", per_class=(2, 1))
    result = subprocess.run([sys.executable, "-m", "finetune.linprobe", "none", "--data_path", str(data), *ARCH, *RUN,
                             "--epochs", "2", "--warmup_epochs", "0", "--head_batch_size", "4"],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert "linprobe  top-1" in result.stdout and "top-5" not in result.stdout  # 3 classes


def test_knn_of_the_fcmae_encoder_equals_knn_of_its_converted_weights(tmp_path):
    """What the pre-training monitor will call: knn_evaluate on FCMAE.encoder (unmasked) during pre-training."""
    from fcmae.data import labelled
    from fcmae.model import build_fcmae
    from fcmae.weights.conversion import convert
    from finetune.model import build_model
    from tests.helpers import randomize_

    data = make_folder(tmp_path / "data", per_class=(4, 2))
    fcmae = randomize_(build_fcmae("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                                   decoder_dim=16), 3).eval()
    dense = build_model("atto", 0, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16)).eval()
    dense.load_state_dict(convert({"model": fcmae.state_dict()}, conv_mlp=False).state_dict, strict=False)
    train, val = knn_core.make_loaders(data, labelled.check_splits(data), input_size=32, crop_pct=1.0, batch_size=5,
                                       num_workers=0)
    device = torch.device("cpu")
    with torch.no_grad():
        feats_sparse = knn_core.extract_features(fcmae.encoder, train, device)[0]
        feats_dense = knn_core.extract_features(dense.forward_features, train, device)[0]
    torch.testing.assert_close(feats_sparse, feats_dense, rtol=1e-5, atol=1e-5)
    assert knn_core.knn_evaluate(fcmae.encoder, train, val, device, 3, k=3) == \
        knn_core.knn_evaluate(dense.forward_features, train, val, device, 3, k=3)
