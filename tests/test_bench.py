"""`dreamloom bench`: the three loops train the same recipe and report comparable figures (speed itself is
measured in BENCHMARKS.md, never asserted here)."""

from __future__ import annotations

import json

from dreamloom.bench import LOOPS
from dreamloom.cli import main


def test_bench_reports_every_loop_with_its_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "tiny-lora", "--steps", "4", "--warmup", "2", "--set", "lora.rank=2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["tiny-lora"]
    for loop in LOOPS:
        figures = results[loop]
        assert figures["ms_step"] > 0 and abs(figures["images_s"] - 2 * figures["steps_s"]) < 0.1  # batch 2
        assert f"| tiny-lora | {loop} | {figures['ms_step']} |" in printed
        assert figures["tflops_s"] > 0  # the step's FLOPs, counted once, over each loop's time
    ratios = results["ratios"]
    assert abs(ratios["dreamloom_over_bare"] - results["dreamloom"]["ms_step"] / results["bare"]["ms_step"]) < 0.01
    assert results["settings"] == {**results["settings"], "resolution": 64, "batch": 2, "steps": 4, "warmup": 2,
                                   "sets": ["lora.rank=2"]}
    assert results["settings"]["step_flops"] > 0
