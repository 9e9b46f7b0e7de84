"""Save the unrounded probabilities `edge-agent predict --model PKG --file FILE` computes, as a float32 .npy.

Run by scripts/arm64/predict.sh on both sides (x86_64 host and the arm64 chroot); not part of CI. `--json`
rounds probabilities to 6 decimals, so comparing two JSON outputs cannot see differences below 1e-6; this runs
the same code path as predict (predict_cli.from_package, read_file, classify) and keeps the float32 values.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edge_agent.predict import read_file
from edge_agent.predict_cli import classify, from_package


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    source = from_package(args.model, int8=False, threads=1)
    inputs = read_file(args.file, source.predictor.labels, source.predictor.modality)
    np.save(args.out, classify(source.predictor, inputs, batch_size=16, progress=False).astype(np.float32))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
