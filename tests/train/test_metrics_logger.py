"""metrics.jsonl is strict JSON: a non-finite value (a skipped step's loss) is written as null,
finite ones as numbers; TensorBoard gets only the finite ones."""
import json
import math

from mdn_scale.train.metrics import MetricsLogger


def test_nonfinite_values_are_logged_as_null(tmp_path):
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, total_steps=3)
    common = {"lr": 1e-3, "tokens_per_s": 100.0}  # the trainer's records carry these (console line)
    log.log(1, {"loss": 2.5, "grad_norm": 1.0, **common})
    log.log(2, {"loss": math.nan, "grad_norm": math.inf, **common})
    log.log(3, {"loss": -math.inf, "grad_norm": 0.5, **common})
    log.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in rows] == [
        (1, 2.5, 1.0), (2, None, None), (3, None, 0.5)]
