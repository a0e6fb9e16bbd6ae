"""bench/default_speed.py end to end on the CPU (tiny preset): it runs train.py per combination and
compares the default with the best; the device run is recorded in bench/RESULTS.md."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_speed_smoke(synthetic_dir, tmp_path):
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, "bench/default_speed.py", "--data", synthetic_dir, "--max-updates", "3",
                           "--warmup", "1", "--combos", "default,--no-cuda-graphs", "--runs", str(tmp_path / "runs"),
                           "--bound", "0.01", "--json", str(out), "--train-args",
                           "--preset tiny --device cpu --batch-size 2 --block-size 16 --grad-accum 1 "
                           "--eval-every 3 --eval-batches 1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["results"]] == ["default", "--no-cuda-graphs"]
    for r in result["results"]:
        assert r["path"] == "reference path (cpu)" and r["updates"] == 3 and r["median_tok_s"] > 0
    assert result["verdict"] == "PASS" and 0 < result["ratio"] <= 1
    assert "PASS: the default runs at" in done.stdout
