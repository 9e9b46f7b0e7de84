"""Host side of the arm64 serving proof: a real fine-tuned model to export, and texts to classify.

Run by scripts/arm64/predict.sh with the repository's x86_64 builder venv; not part of CI. One device trains
paraphrase-MiniLM-L3 (the packaged bundle, real pretrained weights) for one short round on real tweets with the
agent's own LocalLearner on ONNX Runtime Training, and saves it with the agent's own device-state code, exactly as
`edge-agent join` leaves it; predict.sh then runs the real `edge-agent export` on that state. The texts to
classify are the device's own held-out test split (JSONL with labels, so predict prints an accuracy too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from coordinator.datasets import load_tweet_sentiment, write_fleet_data  # noqa: E402
from edge_agent.agent import make_trainer  # noqa: E402
from edge_agent.data import load_examples  # noqa: E402
from edge_agent.device_state import DeviceModel, save_model  # noqa: E402
from edge_agent.local_round import LocalLearner, RoundPlan  # noqa: E402
from export.assets import heterotune_home  # noqa: E402
from export.bundle import BundleRecipe, TaskSpec, build_bundle  # noqa: E402

TWEET_LABELS = ("negative", "neutral", "positive")
AGENT_ID = "pi-serve"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="where the data, state and texts are written")
    parser.add_argument("--steps", type=int, default=12, help="local AdamW steps of the one round")
    parser.add_argument("--texts", type=int, default=48, help="how many held-out texts to classify (at most)")
    args = parser.parse_args()

    data = write_fleet_data(load_tweet_sentiment(max_samples=800, seed=7), [AGENT_ID], args.work / "data",
                            alpha=1.0, seed=7, global_per_class=5, max_per_client=240).client_files[AGENT_ID]
    bundle = build_bundle(BundleRecipe("minilm-l3", TaskSpec("tweet-sentiment", TWEET_LABELS, 64, 8)),
                          root=heterotune_home() / "bundles-uncosted", measure_cost=False, log=False)
    labels = bundle.manifest.task.labels
    learner = LocalLearner(AGENT_ID, bundle.directory, bundle.manifest,
                           make_trainer("ort", bundle.directory, threads=1), load_examples(data, labels))
    outcome = learner.run_round(RoundPlan(round_id=1, local_steps=args.steps, batch_size=8, learning_rate=2e-2,
                                          seed=1, upload_names=()), {})
    save_model(args.work / "state", DeviceModel(
        agent_id=AGENT_ID, run_id="arm64-serve", round_id=1, bundle_sha=bundle.sha256, bundle_dir=bundle.directory,
        backbone=bundle.manifest.backbone, labels=labels, tensors=dict(learner.kept), received={}, optimizer={},
        metrics={"personal_accuracy": outcome.personal.accuracy, "n_train": outcome.n_train,
                 "n_test": outcome.personal.total, "backend": "ort", "method": "heterotune"},
        saved_unix=time.time()))
    with (args.work / "texts.jsonl").open("w") as f:
        for e in learner.test[: args.texts]:
            f.write(json.dumps({"text": e.text, "label": labels[e.label]}) + "\n")  # type: ignore[union-attr]
    print(json.dumps({"data": str(data), "state": str(args.work / "state"),
                      "personal_accuracy": outcome.personal.accuracy, "n_train": outcome.n_train}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
