"""The benchmark commands run and report what they say (tiny settings; timing targets live in BENCHMARKS.md)."""

import time

import pytest
import torch

from fcmae.tools import bench_encoder as bench
from fcmae.tools.bench_parts import timed_call
from sparse.depthwise import CONV_METHODS, WEIGHT_GRAD_METHODS


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The commands set torch's thread count for the process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SMALL = ["--size", "atto", "--batch", "2", "--img-size", "64", "--threads", "1", "--iters", "1", "--warmup", "0"]


def test_timed_call_returns_the_result_and_counts_sleep_only_on_the_wall_clock():
    cpu = torch.device("cpu")
    out, wall = timed_call(lambda: time.sleep(0.05) or "done", cpu)
    assert out == "done" and wall >= 0.05
    assert timed_call(lambda: time.sleep(0.05), cpu, "cpu")[1] < 0.04  # process time: sleeping is not work
    with pytest.raises(ValueError, match="--clock cpu times CPU work only"):
        timed_call(lambda: None, torch.device("cuda"), "cpu")


def test_encoder_mode_times_each_backend_against_timm(capsys):
    results = bench.main(["--backends", "torch", "dense-masked", *SMALL])
    assert set(results) == {"dense (timm)", "torch", "dense-masked"}
    assert all(r["median_s"] > 0 and r["saved_MiB"] > 0 for r in results.values())
    out = capsys.readouterr().out
    assert "median of 1 forward+backward steps" in out and "x dense" in out


def test_step_mode_times_each_backend_and_its_phases(capsys):
    best = bench.main(["--mode", "step", *SMALL])
    assert set(best) == {"torch", "dense-masked"} and all(seconds > 0 for seconds in best.values())
    out = capsys.readouterr().out
    assert "dense-masked" in out and "x dense-masked" in out
    for phase in ("encoder forward", "decoder+loss forward", "decoder+loss backward", "encoder backward",
                  "optimizer"):
        assert out.count(phase) == 2, phase  # once per backend


def test_dwconv_mode_times_every_method_at_every_stage(capsys):
    results = bench.main(["--mode", "dwconv", *SMALL])
    assert [p for p, _ in results] == [8, 4, 2, 1]
    for timings in results.values():
        assert set(timings) == {f"conv:{m}" for m in CONV_METHODS} | {f"wgrad:{m}" for m in WEIGHT_GRAD_METHODS}
    assert "fastest" in capsys.readouterr().out


def test_cpu_clock_is_refused_on_other_devices(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--mode", "step", "--device", "cuda", "--clock", "cpu", *SMALL])
    assert "--clock cpu times CPU work only" in capsys.readouterr().err
