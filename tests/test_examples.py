"""examples/: the own-loop example runs end to end on the bundled digits data, with the public API only."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_own_loop_example_trains_gkp_gsa_and_a_peer():
    """Warm-up, bank, grouping, Fisher, anchors, GKP+GSA and a peer, in a fresh process (6 short epochs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "own_loop.py"), "--epochs", "6",
                           "--group-epoch", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "GroupedSAM covers 21 parameter tensors" in out
    assert "leaves out the head: head.fc.weight, head.fc.bias" in out
    assert re.search(r"epoch 2: \d groups \[\[", out) and "fisher (batch_mean) over" in out
    rose = [(int(a), int(b)) for a, b in re.findall(r"perturbed pass in (\d+) of (\d+) group steps", out)]
    assert len(rose) == 4 and sum(a for a, _ in rose) >= 0.9 * sum(b for _, b in rose)  # the sharpness-aware rise
    top1 = dict(re.findall(r"^(\S+) +top1 ([\d.]+)", proc.stdout, re.M))
    assert set(top1) == {"gkp+gsa", "imbsam"} and all(float(v) > 70 for v in top1.values()), proc.stdout
