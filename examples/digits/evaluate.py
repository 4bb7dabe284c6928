"""Stage `evaluate`: test accuracy and loss of the newest checkpoint -> metrics.json."""

from __future__ import annotations

import json

import torch
from common import load_params, load_split, make_model, run_params
from torch import nn

from modelver import latest_checkpoint, load_checkpoint


def main() -> None:
    p = load_params("train")
    torch.set_num_threads(1)
    info = latest_checkpoint("checkpoints", run=run_params(p))  # the run these params train
    if info is None:
        raise SystemExit("evaluate: no checkpoint of this run in checkpoints/; run the train stage")
    ckpt = load_checkpoint(info.path)
    model = make_model(hidden=p["hidden"], dropout=p["dropout"])
    model.load_state_dict(ckpt.state["model"])
    model.eval()

    x, y = load_split("test")
    with torch.no_grad():
        logits = model(x)
    metrics = {
        "accuracy": round(float((logits.argmax(dim=1) == y).float().mean()), 6),
        "loss": round(float(nn.functional.cross_entropy(logits, y)), 6),
        "step": ckpt.step,
    }
    with open("metrics.json", "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    print(f"step {ckpt.step}: test accuracy {metrics['accuracy']:.4f} loss {metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
