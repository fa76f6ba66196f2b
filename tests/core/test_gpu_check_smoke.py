"""benchmarks/gpu_check.py (run on a lent GPU with full-size models) keeps working: its --smoke mode runs every
method's stages with tiny models on the CPU through the same code."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_smoke_runs_every_stage():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("  ")]
    stages = ("frame-wise ControlNet", "frame-wise T2I-Adapter", "Prompt2Prompt", "image inversion",
              "smoothing, AnimateDiff", "smoothing, ZeroScope", "EVS refine", "I4VGen", "JVID")
    assert len(lines) == 2 * len(stages) and "20 frames, context windows 8/2" in out.stdout
    for stage in stages:
        assert sum(stage in line for line in lines) == 2, stage
